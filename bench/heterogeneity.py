"""Heterogeneous hospitals: every algorithm against local-only and pooled baselines.

Each (algorithm, seed) is one real run of the ``federated-training`` flow (OpenFL over gRPC
with mutual TLS, one collaborator process per site), which also trains the local-only model
of every site and, in simulation, the pooled model, and scores every model on every site's
held-out test set. Figures are measured in this run; nothing is asserted.

    .venv/bin/python bench/heterogeneity.py --dataset heart-disease --seeds 5 [--csv PATH]
    .venv/bin/python bench/heterogeneity.py --dataset ixi-brain [--seeds 1] [--csv PATH]

heart-disease (FLamby's Fed-Heart-Disease, 4 hospitals): mean accuracy over the 4 hospitals'
test sets, mean ± sd over seeds, with FLamby's published figure beside it. ``--standardise``
picks the feature scaling: ``site`` (each hospital's own statistics, FLamby's federated
protocol), ``federated`` (one scale from the hospitals' feature sums), or ``both`` (default).

ixi-brain (the demo's 3 hospitals with scanner shift): Dice per site for each algorithm, the
global model against the best single-site model there.
"""
from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("FEDWARD_DATA", str((REPO.parent / "shared" / "data").resolve()))
os.environ.setdefault("FEDWARD_HOME", str(REPO / ".fedward" / "bench"))  # keep the demo's store clean

ALGORITHMS = ("fedavg", "fedprox", "scaffold", "fedadam", "fedyogi")
# FLamby (owkin/FLamby, Fed-Heart-Disease, 5 seeds): mean accuracy over the 4 test sets.
FLAMBY = {"fedavg": 0.685, "fedprox": 0.685, "scaffold": 0.684, "fedadam": 0.726, "fedyogi": 0.731,
          "pooled": 0.735, "best local": 0.722}


def _run(base: dict, spec_dir: Path, workdir: Path, **changes) -> dict:
    from flows.federated_training import federated_training

    import socket

    with socket.socket() as sock:  # a fresh port per run: the last run's may still be in TIME_WAIT
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    spec = {**base, **changes, "aggregator": {**base.get("aggregator", {}), "port": port}}
    path = spec_dir / f"{spec_file_name(changes)}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return federated_training(str(path), workdir=str(workdir))


def spec_file_name(changes: dict) -> str:
    """A short file name for one run's spec: its scalar changes (a changed task is named "task")."""
    parts = [str(v) if isinstance(v, (str, int, float)) else str(k) for k, v in changes.items()]
    return "-".join(parts).replace(".", "")


def _mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def heart_disease(args, base: dict, spec_dir: Path, workdir: Path) -> list[dict]:
    modes = ("site", "federated") if args.standardise == "both" else (args.standardise,)
    rows: list[dict] = []
    t_all = time.time()
    for mode in modes:
        acc: dict[str, list[float]] = {}
        sites: list[str] = []
        for seed in range(args.seeds):
            for i, algorithm in enumerate(args.algorithms):
                t = time.time()
                task = {**base["task"], "standardise": mode}
                s = _run(base, spec_dir, workdir, task=task, algorithm=algorithm, seed=seed)
                scores = s["scores"]
                sites = list(scores)
                mean = lambda model: statistics.mean(scores[x][model] for x in sites)  # noqa: E731
                acc.setdefault(algorithm, []).append(mean("global"))
                if i == 0:  # baselines do not depend on the algorithm: take them from one run per seed
                    for k in sites:
                        acc.setdefault(f"local {k}", []).append(mean(f"local-{k}"))
                    acc.setdefault("pooled", []).append(mean("pooled"))
                print(f"[{mode} standardisation] seed {seed} {algorithm}: mean accuracy {acc[algorithm][-1]:.3f} "
                      f"(gate {'passed' if s['gate']['passed'] else 'refused'}; {time.time() - t:.0f} s)", flush=True)
        locals_ = [k for k in acc if k.startswith("local ")]
        best = max(locals_, key=lambda k: statistics.mean(acc[k]))
        for name in [*args.algorithms, *locals_, "best local", "pooled"]:
            values = acc[best] if name == "best local" else acc[name]
            m, sd = _mean_sd(values)
            rows.append({"standardise": mode, "algorithm": name if name != "best local" else f"best local ({best[6:]})",
                         "mean_accuracy": round(m, 4), "sd": round(sd, 4), "seeds": len(values),
                         "flamby": FLAMBY.get(name, "")})
    print(f"\n{len(args.algorithms) * args.seeds * len(modes)} federations in {time.time() - t_all:.0f} s\n")
    print("Fed-Heart-Disease: mean accuracy over the 4 hospitals' test sets, mean ± sd over "
          f"{args.seeds} seed(s)")
    head = f"{'algorithm':<30}" + "".join(f"{'std: ' + m:>20}" for m in modes) + f"{'FLamby':>10}"
    print(head)
    names = [r["algorithm"] for r in rows if r["standardise"] == modes[0]]
    for i, name in enumerate(names):
        cells = []
        for m in modes:
            r = [x for x in rows if x["standardise"] == m][i]
            label = r["algorithm"]
            cells.append(f"{r['mean_accuracy']:.3f} ± {r['sd']:.3f}" + ("*" if label != name else " "))
        fl = rows[i]["flamby"]
        print(f"{name:<30}" + "".join(f"{c:>20}" for c in cells) + f"{(f'{fl:.3f}' if fl != '' else '—'):>10}")
    print("local <site>: that hospital's local-only model scored on all 4 test sets (as FLamby scores local models);")
    print("'*': the best local model under that standardisation is a different hospital's (see the CSV).")
    return rows


def ixi_brain(args, base: dict, spec_dir: Path, workdir: Path) -> list[dict]:
    rows = []
    for seed in range(args.seeds):
        for algorithm in args.algorithms:
            changes: dict = {"algorithm": algorithm, "seed": seed}
            if algorithm == "fedbn":  # FedBN needs normalisation layers with parameters to keep local
                changes["task"] = {**base["task"], "model": {**base["task"]["model"], "norm": "instance_affine"}}
            t = time.time()
            s = _run(base, spec_dir, workdir, **changes)
            for site, r in s["sites"].items():
                rows.append({"algorithm": algorithm, "seed": seed, "site": site, "global_dice": round(r["global"], 4),
                             "local_dice": round(r["local"], 4), "best_single_site_dice": round(r["best_single_site"], 4),
                             "best_single_site_model": r["best_single_site_model"],
                             "global_minus_best": round(r["global"] - r["best_single_site"], 4),
                             "gate": "passed" if s["gate"]["passed"] else "refused"})
            print(f"seed {seed} {algorithm}: {time.time() - t:.0f} s, gate {'passed' if s['gate']['passed'] else 'refused'}",
                  flush=True)
    print("\nIXI brain mask, 3 hospitals with scanner shift: Dice on each site's held-out test cases")
    print(f"{'algorithm':<10} {'seed':>4} {'site':<12} {'global':>8} {'best single site (model)':>32} {'global - best':>14}")
    for r in rows:
        print(f"{r['algorithm']:<10} {r['seed']:>4} {r['site']:<12} {r['global_dice']:>8.4f} "
              f"{r['best_single_site_dice']:>12.4f} ({r['best_single_site_model']:<16}) {r['global_minus_best']:>+14.4f}")
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", choices=["heart-disease", "ixi-brain"], required=True)
    ap.add_argument("--seeds", type=int, default=None, help="default: 5 for heart-disease, 1 for ixi-brain")
    ap.add_argument("--algorithms", default=None,
                    help=f"comma-separated (default: {','.join(ALGORITHMS)}; ixi-brain adds fedbn)")
    ap.add_argument("--standardise", choices=["site", "federated", "both"], default="both",
                    help="heart-disease feature scaling (default: both, side by side)")
    ap.add_argument("--csv", help="also write the table here")
    args = ap.parse_args()
    args.seeds = args.seeds or (5 if args.dataset == "heart-disease" else 1)
    default = ALGORITHMS + (("fedbn",) if args.dataset == "ixi-brain" else ())
    args.algorithms = tuple(args.algorithms.split(",")) if args.algorithms else default

    spec_file = REPO / "federations" / f"{args.dataset}.yaml"
    base = yaml.safe_load(spec_file.read_text())
    for s in base["sites"]:  # absolute paths: the bench writes its specs elsewhere
        data = os.path.expandvars(s["data"])
        s["data"] = str((spec_file.parent / data).resolve()) if not os.path.isabs(data) else data
    if args.dataset == "ixi-brain" and not all(Path(s["data"]).is_dir() for s in base["sites"]):
        from flows.demo_data import prepare_ixi_sites

        prepare_ixi_sites(Path(os.environ["FEDWARD_DATA"]) / "ixi-hh", REPO / ".fedward" / "sites")
    with tempfile.TemporaryDirectory(prefix="fedward-bench-") as tmp:
        spec_dir, workdir = Path(tmp) / "specs", Path(tmp) / "runs"
        spec_dir.mkdir()
        rows = (heart_disease if args.dataset == "heart-disease" else ixi_brain)(args, base, spec_dir, workdir)
    if args.csv:
        out = Path(args.csv)
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
