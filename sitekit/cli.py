"""``sitekit``: the commands a participant runs in its own folder.

- ``sitekit check-data``  check every case of this site's data; only aggregate counts are printed
- ``sitekit keygen``      make this participant's private key (stays here) and certificate request
- ``sitekit train-local`` train the local-only baseline on this site's data, same budget as a federated run
- ``sitekit evaluate``    score models on this site's held-out test cases; only Dice numbers leave

Each command reads only the workspace folder it is given and the site's own data folder.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from sitekit import __version__


def cmd_check_data(args) -> int:
    """Check every case of this site's data; print only aggregate counts (JSON) on success."""
    from dataclasses import asdict

    from sitekit.data import inspect_site

    summary = inspect_site(args.site, Path(args.data))
    print(json.dumps(asdict(summary)))
    return 0


def cmd_keygen(args) -> int:
    from sitekit.engine.openfl_adapter import participant_layout
    from sitekit.pki import make_key_and_request

    folder = Path(args.workspace)
    paths = participant_layout(folder, args.role, args.name)
    make_key_and_request(paths["key"], paths["csr"], args.name, dns_name=args.name if args.role == "aggregator" else None)
    print(paths["csr"])
    return 0


def _site(folder: Path):
    import torch

    from sitekit.engine.openfl_adapter import site_settings

    torch.set_num_threads(int(os.environ.get("FEDWARD_TORCH_THREADS", "1")))
    return site_settings(folder)


def cmd_train_local(args) -> int:
    """Local-only baseline: rounds x epochs-per-round epochs on this site's data alone."""
    import torch

    from sitekit.data import SiteVolumes
    from sitekit.model import build_loss, build_model
    from sitekit.training import make_loader, make_optimizer, train_epoch

    folder = Path(args.workspace)
    s = _site(folder)
    train = SiteVolumes(s["site"], s["data"], "train", s["input_size"])
    model = build_model(s["task"], seed=s["seed"])
    opt = make_optimizer(model, s["learning_rate"])
    loss_fn = build_loss(s["task"])
    epochs = s["rounds"] * s["epochs_per_round"]
    steps, history = 0, []
    for epoch in range(epochs):
        loader = make_loader(train, s["batch_size"], shuffle=True, seed=s["seed"] * 100003 + epoch + 1)
        r = train_epoch(model, loader, opt, loss_fn)
        steps += r.steps
        history.append(r.loss)
        print(f"[{s['site']}] local-only epoch {epoch + 1}/{epochs}: loss {r.loss:.4f}", flush=True)
    out = folder / "local" / "model.pt"
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), out.with_suffix(".tmp"))
    os.replace(out.with_suffix(".tmp"), out)
    (folder / "local" / "training.json").write_text(json.dumps({"steps": steps, "epochs": epochs, "loss": history}))
    return 0


def cmd_evaluate(args) -> int:
    """Dice of each given model on this site's test cases, written to --out as JSON."""
    import torch

    from sitekit.data import SiteVolumes
    from sitekit.model import build_model
    from sitekit.training import evaluate_dice

    folder = Path(args.workspace)
    s = _site(folder)
    test = SiteVolumes(s["site"], s["data"], "test", s["input_size"])
    scores = {}
    for spec in args.model:
        name, path = spec.split("=", 1)
        model = build_model(s["task"])
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        scores[name] = evaluate_dice(model, test)
        print(f"[{s['site']}] {name}: Dice {scores[name]:.4f} on {len(test)} test cases", flush=True)
    out = Path(args.out)
    out.write_text(json.dumps({"site": s["site"], "test_cases": len(test), "dice": scores}))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="sitekit", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--version", action="version", version=f"sitekit {__version__}")
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("check-data", help="check this site's data folder; prints aggregate counts only")
    d.add_argument("--site", required=True)
    d.add_argument("--data", required=True)
    k = sub.add_parser("keygen", help="make this participant's key and certificate request")
    k.add_argument("--workspace", required=True)
    k.add_argument("--role", choices=["site", "aggregator"], required=True)
    k.add_argument("--name", required=True, help="site name, or the aggregator's host name")
    t = sub.add_parser("train-local", help="train this site's local-only baseline")
    t.add_argument("--workspace", required=True)
    e = sub.add_parser("evaluate", help="score models on this site's test cases")
    e.add_argument("--workspace", required=True)
    e.add_argument("--model", action="append", required=True, help="NAME=PATH of a state dict; repeatable")
    e.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    from sitekit.data import DataError

    try:
        return {"check-data": cmd_check_data, "keygen": cmd_keygen, "train-local": cmd_train_local,
                "evaluate": cmd_evaluate}[args.cmd](args)
    except (DataError, FloatingPointError) as exc:
        print(f"sitekit: {exc}", file=sys.stderr)
        if getattr(args, "workspace", None):
            (Path(args.workspace) / "status.json").write_text(json.dumps({"exit": 3, "reason": str(exc)}))
        return 3


if __name__ == "__main__":
    sys.exit(main())
