"""Privacy against utility on PneumoniaMNIST, and the gradient-inversion audit. Prints measured figures.

Each noise level is one real run of the ``privacy-sweep`` flow's children (the full
``federated-training`` flow: OpenFL over gRPC with mutual TLS, one collaborator process per
hospital, DP-SGD with Opacus at each site), on ``federations/pneumonia-dp.yaml``: three
hospitals of 2118 / 1554 / 1036 training X-rays (``fedward prepare-pneumonia``), 5 rounds of
2 local epochs, batch 64. ε is the worst hospital's (the smallest: its sampling rate is
highest) at δ = 1e-5; AUC is the global model's on the three test sets, weighted by test cases.
Nothing is asserted.

    .venv/bin/python bench/privacy_utility.py [--noise 0,0.5,0.7,1,2] [--seeds 1] [--audit] [--csv PATH]

``--audit`` also runs ``fedward audit`` at the smallest hospital (batch sizes 1, 4, 16) and
prints its PSNR/SSIM table; the images stay in that hospital's folder.
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("FEDWARD_DATA", str((REPO.parent / "shared" / "data").resolve()))
os.environ.setdefault("FEDWARD_HOME", str(REPO / ".fedward" / "bench"))  # keep the demo's store clean

SPEC = REPO / "federations" / "pneumonia-dp.yaml"


def _spec_with_seed(seed: int, folder: Path) -> Path:
    import yaml

    from sitekit.spec import load_spec

    spec = load_spec(SPEC)
    raw = yaml.safe_load(SPEC.read_text())
    raw["seed"] = seed
    raw["sites"] = [{**r, "data": str(s.data)} for r, s in zip(raw["sites"], spec.sites)]  # absolute paths; governance kept
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"pneumonia-dp-seed{seed}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--noise", default="0,0.5,0.7,1,2")
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--audit", action="store_true")
    ap.add_argument("--iterations", type=int, default=1500)
    ap.add_argument("--csv")
    args = ap.parse_args()

    from flows.pneumonia_data import prepare_pneumonia_sites
    from flows.privacy_sweep import parse_noise_levels, privacy_sweep
    from sitekit.spec import load_spec

    prepare_pneumonia_sites(Path(os.environ["FEDWARD_DATA"]) / "medmnist" / "pneumoniamnist.npz",
                            REPO / ".fedward" / "sites-pneumonia")
    spec = load_spec(SPEC)
    levels = parse_noise_levels(args.noise)
    work = Path(os.environ["FEDWARD_HOME"]) / "runs"
    t0 = time.time()
    by_level: dict[float, list[dict]] = {}
    for seed in range(args.seeds):
        result = privacy_sweep(str(_spec_with_seed(seed, work / "specs")), levels, workdir=str(work))
        for row in result["rows"]:
            by_level.setdefault(row["noise_multiplier"], []).append(row)
    sites = spec.site_names

    def ms(values):
        return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)

    print(f"\nPneumoniaMNIST, 3 hospitals, {spec.rounds} rounds x {spec.local_epochs} epochs, batch {spec.batch_size}, "
          f"clip {spec.privacy.clip:g}, delta {spec.privacy.delta:g}, {args.seeds} seed(s), {time.time() - t0:.0f} s")
    print(f"{'noise':>6}  {'epsilon':>8}  {'AUC (weighted)':>16}  " + "  ".join(f"{s:>12}" for s in sites))
    table = []
    for z in levels:
        rows = by_level[z]
        eps = rows[0]["epsilon"]
        m, sd = ms([r["auc"] for r in rows])
        per = [ms([r[f"auc.{s}"] for r in rows])[0] for s in sites]
        table.append({"noise_multiplier": z, "epsilon": eps, "auc_mean": m, "auc_sd": sd,
                      **{f"auc.{s}": v for s, v in zip(sites, per)}, "seeds": len(rows)})
        eps_text = "inf" if math.isinf(eps) else f"{eps:.2f}"
        print(f"{z:>6g}  {eps_text:>8}  {m:>9.4f} ± {sd:.4f}  " + "  ".join(f"{v:>12.4f}" for v in per))
    base = next((r for r in table if math.isinf(r["epsilon"])), None)
    default = next((r for r in table if r["noise_multiplier"] == spec.privacy.noise_multiplier), None)
    if base and default:
        print(f"default setting (noise {default['noise_multiplier']:g}): epsilon {default['epsilon']:.2f} at delta "
              f"{spec.privacy.delta:g} (target {spec.privacy.target_epsilon:g}); AUC {default['auc_mean']:.4f} against "
              f"{base['auc_mean']:.4f} without DP: a cost of {base['auc_mean'] - default['auc_mean']:.4f}")
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(table[0]))
            w.writeheader()
            w.writerows(table)
    if args.audit:
        from flows.audit import audit_flow

        site = sites[-1]
        report = audit_flow(str(SPEC), site, batch_sizes=[1, 4, 16], iterations=args.iterations)
        print(f"\ngradient-inversion audit at {site} (initial model, {args.iterations} iterations):")
        print(f"{'batch':>5}  {'setting':<10} {'PSNR dB':>8} {'SSIM':>6}  {'mean-image PSNR':>15} {'SSIM':>6}  leaks")
        for r in report["rows"]:
            print(f"{r['batch_size']:>5}  {r['setting']:<10} {r['psnr']:>8.2f} {r['ssim']:>6.3f}  {r['baseline_psnr']:>15.2f} "
                  f"{r['baseline_ssim']:>6.3f}  {'YES' if r['leaks'] else 'no'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
