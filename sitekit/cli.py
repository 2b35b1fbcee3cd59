"""``sitekit``: the commands a participant runs in its own folder.

- ``sitekit check-data``  check every case of this site's data; only aggregate counts are printed
- ``sitekit keygen``      make this participant's private key (stays here) and certificate request
- ``sitekit train-local`` train the local-only baseline on this site's data, same budget as a federated run
- ``sitekit personalise`` fine-tune the global model on this site's data (personalised model)
- ``sitekit evaluate``    score models on this site's held-out test cases; only the scores leave
- ``sitekit ingest``      fetch labelled series from this site's PACS (DICOMweb) into its data folder as NIfTI
- ``sitekit audit``       gradient-inversion attack on this site's own update; images stay here, numbers leave

For hospital IT (see sitekit/deploy.py): ``fetch`` -> ``preflight`` -> ``approve`` -> ``join``.

Each command reads only the workspace folder it is given and the site's own data folder.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from sitekit import __version__
from sitekit.data import DataError


def cmd_check_data(args) -> int:
    """Check every case of this site's data; print only aggregate counts (JSON) on success."""
    from sitekit.spec import ModelSpec, TaskSpec
    from sitekit.tasks import get_task

    if args.kind == "tabular":
        task = TaskSpec(model=ModelSpec(name="logreg"), kind="tabular", dataset=args.dataset)
    elif args.kind == "classification":
        task = TaskSpec(model=ModelSpec(name="cnn2d"), kind="classification", metric="auc", loss="bce")
    else:
        task = TaskSpec(model=ModelSpec())
    if not args.data.strip():  # Path('') is the current folder: never scan whatever folder IT happens to be in
        raise DataError(f"site '{args.site}': --data is empty; give the site's data folder.")
    t = get_task(task)
    out = t.inspect(args.site, Path(args.data))
    if args.feature_sums:  # the site's share of a federated standardisation (aggregates only)
        out["feature_sums"] = t.feature_sums(args.site, Path(args.data))
    print(json.dumps(out))
    return 0


def cmd_keygen(args) -> int:
    import datetime as dt

    from sitekit.layout import participant_layout  # not the engine: keygen runs on the slim image too
    from sitekit.pki import make_key_and_request
    from sitekit.sitehome import SiteError
    from sitekit.spec import DNS_NAME, SITE_NAME

    name, folder = args.name, Path(args.workspace)
    if args.role == "site" and not SITE_NAME.fullmatch(name):
        raise SiteError(f"--name {name!r} is not a site name: use the name the federation spec gives this site "
                        "(lower-case letters, digits and '-', 2-40 characters).")
    if args.role == "aggregator" and not DNS_NAME.fullmatch(name):
        raise SiteError(f"--name {name!r} is not a DNS name: give the host name the sites dial (e.g. aggregator.example.org).")
    if folder.exists() and not folder.is_dir():
        raise SiteError(f"--workspace {folder} is a file, not a folder: give this participant's own folder.")
    paths = participant_layout(folder, args.role, name)
    if paths["key"].exists():  # a hospital's key is made once; replacing it would orphan the request already sent
        made = dt.datetime.fromtimestamp(paths["key"].stat().st_mtime).strftime("%Y-%m-%d %H:%M")
        raise SiteError(f"site '{name}': a private key already exists at {paths['key']} (made {made}); keygen never replaces "
                        f"it. Send the existing request {paths['csr']}, or, to start over, move the key away yourself "
                        "and tell the federation a new request is coming.")
    make_key_and_request(paths["key"], paths["csr"], name, dns_name=name if args.role == "aggregator" else None)
    print(paths["csr"])
    return 0


def _site(folder: Path):
    import torch

    from sitekit.engine.openfl_adapter import site_settings

    from sitekit.tasks import get_task

    torch.set_num_threads(int(os.environ.get("FEDWARD_TORCH_THREADS", "1")))
    s = site_settings(folder)
    s["task_obj"] = get_task(s["task"])
    return s


def _save_state(model, out: Path) -> None:
    import torch

    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), out.with_suffix(".tmp"))
    os.replace(out.with_suffix(".tmp"), out)


def _train(s: dict, model, train, rounds: int, label: str, steps_per_round=None, epochs_per_round=None,
           history: list | None = None) -> int:
    """``rounds`` blocks of training with a fresh Adam each block, as a site trains inside a federation."""
    from sitekit.training import make_loader, make_optimizer, train_round

    loss_fn = s["task_obj"].loss()
    steps = 0
    epoch = [0]

    def loaders():
        while True:
            epoch[0] += 1
            yield make_loader(train, s["batch_size"], shuffle=True, seed=s["seed"] * 100003 + epoch[0])

    it = loaders()
    for r in range(rounds):
        opt = make_optimizer(model, s["learning_rate"])
        res = train_round(model, it, opt, loss_fn, epochs=epochs_per_round or s["epochs_per_round"],
                          steps=steps_per_round if epochs_per_round is None else None)
        steps += res.steps
        if history is not None:
            history.append(res.loss)
        print(f"[{s['site']}] {label} epoch {r + 1}/{rounds}: loss {res.loss:.4f}", flush=True)
    return steps


def cmd_train_local(args) -> int:
    """Local-only baseline: the federation's budget (rounds x local work per round) on this site's data alone."""
    folder = Path(args.workspace)
    s = _site(folder)
    train = s["task_obj"].dataset(s["site"], s["data"], "train")
    model = s["task_obj"].build_model(seed=s["seed"])
    history: list[float] = []
    rounds = args.rounds or s["rounds"]  # fewer when the federation stopped early (privacy budget)
    steps = _train(s, model, train, rounds, "local-only", steps_per_round=s["steps_per_round"], history=history)
    _save_state(model, folder / "local" / "model.pt")
    (folder / "local" / "training.json").write_text(json.dumps({"steps": steps, "rounds": rounds, "loss": history}))
    return 0


def cmd_personalise(args) -> int:
    """Fine-tune the global model on this site's data for N epochs (FedBN: with this site's own norm layers)."""
    import torch

    from sitekit.engine.openfl_adapter import site_local_tensors

    folder = Path(args.workspace)
    s = _site(folder)
    train = s["task_obj"].dataset(s["site"], s["data"], "train")
    model = s["task_obj"].build_model(seed=s["seed"])
    state = model.state_dict()
    state.update(torch.load(args.model, map_location="cpu", weights_only=True))
    state.update(site_local_tensors(folder))
    model.load_state_dict(state)
    _train(s, model, train, 1, "personalisation", epochs_per_round=args.epochs)
    _save_state(model, folder / "personalised" / "model.pt")
    return 0


def cmd_evaluate(args) -> int:
    """Dice of each given model on this site's test cases, written to --out as JSON."""
    import torch

    from sitekit.engine.openfl_adapter import site_local_tensors

    folder = Path(args.workspace)
    s = _site(folder)
    task = s["task_obj"]
    test = task.dataset(s["site"], s["data"], "test")
    own = site_local_tensors(folder)  # FedBN: this site's normalisation layers complete the shared model
    scores = {}
    for spec in args.model:
        name, path = spec.split("=", 1)
        model = task.build_model(seed=s["seed"])
        state = model.state_dict()
        state.update(torch.load(path, map_location="cpu", weights_only=True))
        if name in ("global", "champion"):  # both are federated models: the site's own layers complete them
            state.update(own)
        model.load_state_dict(state)
        scores[name] = task.evaluate(model, test)
        print(f"[{s['site']}] {name}: {task.metric} {scores[name]:.4f} on {len(test)} test cases", flush=True)
    out = Path(args.out)
    out.write_text(json.dumps({"site": s["site"], "test_cases": len(test), "metric": task.metric, "scores": scores}))
    return 0


def cmd_ingest(args) -> int:
    """Query the site's PACS, fetch every DICOM-SEG and its images, write NIfTI cases; print a JSON summary."""
    from sitekit.pacs import PASSWORD_ENV, IngestError, ingest

    try:
        summary = ingest(args.site, args.pacs_url, Path(args.data), cache=Path(args.cache) if args.cache else None,
                         split=args.split, studies=args.study, overlap=args.overlap, user=args.pacs_user,
                         password=os.environ.get(PASSWORD_ENV), ca_bundle=args.pacs_ca,
                         log=lambda line: print(line, flush=True))
    except IngestError as exc:
        print(f"sitekit: {exc}", file=sys.stderr)
        return 3
    print(json.dumps(summary.as_dict()))
    if not (summary.written or summary.present) or (args.strict and summary.skipped):
        print(f"sitekit: site '{args.site}': {len(summary.skipped)} of {summary.segmentations} segmentations could not "
              "become cases (reasons above)", file=sys.stderr)
        return 3
    return 0


def audit_settings(s: dict) -> list:
    """The settings an audit compares: no DP, and the federation's configured DP at this site
    (dp-sgd z = 1, C = 1 for comparison when the spec has none)."""
    from sitekit.inversion import Setting
    from sitekit.privacy import site_budget

    settings = [Setting("no-dp", "none")]
    p = s["privacy"]
    if p is None:
        settings.append(Setting("dp-sgd-default", "dp-sgd", 1.0, 1.0))
    elif p["mode"] == "dp-sgd":
        n = len(s["task_obj"].dataset(s["site"], s["data"], "train"))
        b = site_budget(p, n, s["batch_size"], s["epochs_per_round"], s["steps_per_round"], s["rounds"])
        settings.append(Setting("dp-sgd", "dp-sgd", b.noise_multiplier, b.clip))
    else:
        from sitekit.privacy import federation_budget

        b = federation_budget(p, s["rounds"])
        settings.append(Setting(f"client-dp-{p['noise_at']}", "client-dp", b.noise_multiplier, b.clip, p["noise_at"],
                                s["learning_rate"]))
    return settings


def cmd_audit(args) -> int:
    """Gradient-inversion audit of this site's own update (see sitekit.inversion).

    Reconstructions and the figure are written under --out in this folder and never leave it;
    the last line printed is the report: numbers only."""
    import torch

    from sitekit.inversion import figure, run_audit

    folder = Path(args.workspace)
    s = _site(folder)
    if s["task"].kind != "classification":
        raise DataError(f"site '{s['site']}': the gradient-inversion audit reconstructs 2D images; this federation's "
                        f"task is {s['task'].kind}, which the audit does not cover yet.")
    from sitekit.classification import to_unit

    task = s["task_obj"]
    train = task.dataset(s["site"], s["data"], "train")
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(s["seed"]))[:max(sizes)]
    x, y = train.x[order], train.y[order]
    model = task.build_model(seed=s["seed"])
    which = "the initial model (what every site trains on in round 1)"
    if args.model:
        state = model.state_dict()
        state.update(torch.load(args.model, map_location="cpu", weights_only=True))
        model.load_state_dict(state)
        which = f"the model {args.model}"
    settings = audit_settings(s)
    print(f"[{s['site']}] gradient-inversion audit of {which}: batch sizes {sizes}, {args.iterations} iterations, "
          f"settings {', '.join(x.name for x in settings)}", flush=True)
    report, pictures = run_audit(model, task.loss(), x, y, train.x.mean(0, keepdim=True), settings, sizes,
                                 args.iterations, to_unit, seed=s["seed"],
                                 progress=lambda line: print(f"[{s['site']}] {line}", flush=True))
    out = folder / args.out
    out.mkdir(parents=True, exist_ok=True)
    import numpy as np

    arrays = {f"{k}/{part}": v[i].numpy() for k, v in pictures.items() for i, part in enumerate(("real", "reconstructed"))}
    tmp = out / ".reconstructions.npz.tmp"
    with open(tmp, "wb") as f:
        np.savez_compressed(f, **arrays)
    os.replace(tmp, out / "reconstructions.npz")
    fig = figure(pictures, report["rows"])
    fig.savefig(out / ".reconstructions.tmp.png", dpi=120)
    os.replace(out / ".reconstructions.tmp.png", out / "reconstructions.png")
    report.update(site=s["site"], model=("given" if args.model else "initial"), iterations=args.iterations,
                  batch_sizes=sizes, figure=str(out / "reconstructions.png"))
    (out / "report.json").write_text(json.dumps(report, indent=1))
    print(f"[{s['site']}] reconstructions and figure kept at this site: {out}", flush=True)
    print(json.dumps({k: v for k, v in report.items() if k != "figure"}), flush=True)  # numbers only
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="sitekit", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--version", action="version", version=f"sitekit {__version__}")
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("check-data", help="check this site's data folder; prints aggregate counts only")
    d.add_argument("--site", required=True)
    d.add_argument("--data", required=True)
    d.add_argument("--kind", choices=["segmentation", "tabular", "classification"], default="segmentation")
    d.add_argument("--dataset", default=None, help="tabular tasks: which dataset reader (heart-disease)")
    d.add_argument("--feature-sums", action="store_true",
                   help="tabular tasks: also print this site's count, feature sums and sums of squares")
    k = sub.add_parser("keygen", help="make this participant's key and certificate request")
    k.add_argument("--workspace", required=True)
    k.add_argument("--role", choices=["site", "aggregator"], required=True)
    k.add_argument("--name", required=True, help="site name, or the aggregator's host name")
    t = sub.add_parser("train-local", help="train this site's local-only baseline")
    t.add_argument("--workspace", required=True)
    t.add_argument("--rounds", type=int, default=None, help="rounds of local training (default: the plan's)")
    pz = sub.add_parser("personalise", help="fine-tune the global model on this site's data")
    pz.add_argument("--workspace", required=True)
    pz.add_argument("--model", required=True, help="path of the global model's state dict")
    pz.add_argument("--epochs", type=int, required=True)
    e = sub.add_parser("evaluate", help="score models on this site's test cases")
    e.add_argument("--workspace", required=True)
    e.add_argument("--model", action="append", required=True, help="NAME=PATH of a state dict; repeatable")
    e.add_argument("--out", required=True)
    a = sub.add_parser("audit", help="gradient-inversion audit of this site's own update (images stay here)")
    a.add_argument("--workspace", required=True)
    a.add_argument("--model", default=None, help="state dict to attack (default: the federation's initial model)")
    a.add_argument("--batch-sizes", default="1,4,16")
    a.add_argument("--iterations", type=int, default=1500)
    a.add_argument("--out", default="audit")
    g = sub.add_parser("ingest", help="fetch labelled series from this site's PACS (DICOMweb) as NIfTI cases")
    g.add_argument("--site", required=True)
    g.add_argument("--data", required=True, help="the site's data folder (imagesTr/, labelsTr/ are written there)")
    g.add_argument("--pacs-url", required=True, help="the PACS's DICOMweb root, e.g. https://pacs.local/dicom-web")
    g.add_argument("--pacs-user", default=None, help="PACS user; the password is read from $SITEKIT_PACS_PASSWORD")
    g.add_argument("--pacs-ca", default=None, help="CA certificate (PEM) of an HTTPS PACS")
    g.add_argument("--cache", default=None, help="where fetched DICOM is kept (default DATA/dicom)")
    g.add_argument("--split", choices=["train", "test"], default="train", help="imagesTr/labelsTr or imagesTs/labelsTs")
    g.add_argument("--study", action="append", default=None, help="a Study Instance UID to ingest; repeatable (default: all)")
    g.add_argument("--overlap", choices=["highest", "refuse"], default="highest",
                   help="overlapping segments: keep the highest segment number, or refuse the segmentation")
    g.add_argument("--strict", action="store_true", help="exit 3 if any segmentation could not become a case")
    from sitekit import deploy  # fetch, preflight, approve, join: what hospital IT runs

    handlers = {"check-data": cmd_check_data, "keygen": cmd_keygen, "train-local": cmd_train_local,
                "personalise": cmd_personalise, "evaluate": cmd_evaluate, "ingest": cmd_ingest, "audit": cmd_audit, **deploy.add_commands(sub)}
    args = ap.parse_args(argv)

    try:
        return handlers[args.cmd](args)
    except deploy.USER_ERRORS as exc:
        print(f"sitekit {args.cmd}: {exc}", file=sys.stderr)
        return deploy.EXIT_NETWORK if isinstance(exc, ConnectionError) else deploy.EXIT_REFUSED
    except (DataError, FloatingPointError) as exc:
        print(f"sitekit: {exc}", file=sys.stderr)
        if getattr(args, "workspace", None):
            (Path(args.workspace) / "status.json").write_text(json.dumps({"exit": 3, "reason": str(exc)}))
        return 3


if __name__ == "__main__":
    sys.exit(main())
