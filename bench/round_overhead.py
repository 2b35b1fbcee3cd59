"""Where a round's time goes: local training vs everything else (federation overhead).

Runs a federation (default: the demo, federations/ixi-brain.yaml) through the real
federated-training flow and prints, per round, the wall time from the first task handed out
to the round's aggregation, the slowest site's local training time, and the rest. Also the
time from flow start to the first round. Figures are measured in this run; nothing is asserted.

    .venv/bin/python bench/round_overhead.py [SPEC] [--json PATH]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("spec", nargs="?", default=str(REPO / "federations" / "ixi-brain.yaml"))
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()

    from flows.federated_training import federated_training

    t = time.time()
    summary = federated_training(args.spec)
    total = time.time() - t
    hist = summary["round_history"]
    timing = summary["timing"]

    print()
    print(f"federation {Path(args.spec).name}: {len(hist)} rounds, {len(summary['sites'])} sites")
    print(f"{'round':>5} {'wall s':>8} {'training s':>11} {'other s':>8} {'other %':>8}")
    for h in hist:
        share = 100 * h["overhead_seconds"] / h["wall_seconds"] if h["wall_seconds"] else float("nan")
        print(f"{h['round'] + 1:>5} {h['wall_seconds']:>8.1f} {h['train_seconds']:>11.1f} {h['overhead_seconds']:>8.1f} {share:>7.1f}%")
    walls = [h["wall_seconds"] for h in hist]
    trains = [h["train_seconds"] for h in hist]
    others = [h["overhead_seconds"] for h in hist]
    print(f"{'mean':>5} {statistics.mean(walls):>8.1f} {statistics.mean(trains):>11.1f} {statistics.mean(others):>8.1f} "
          f"{100 * sum(others) / sum(walls):>7.1f}%")
    print()
    print(f"flow start -> aggregator listening : {timing['aggregator_listening_s']:.1f} s")
    print(f"flow start -> first round starts   : {timing['first_round_start_s']:.1f} s")
    print(f"whole flow (incl. baselines, eval) : {total:.1f} s")
    print("'training' is the slowest site's time inside train epochs; 'other' is everything else in the round:")
    print("validation of the incoming and the locally trained model, tensor transfer over mTLS, aggregation, waits.")
    if args.json:
        Path(args.json).write_text(json.dumps({"rounds": hist, "timing": timing, "total_seconds": total}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
