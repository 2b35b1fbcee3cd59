"""``fedward``: the MLOps engineer's command line.

- ``fedward run SPEC [--summary PATH]``   run the ``federated-training`` flow for a federation spec
- ``fedward prepare-ixi``                  build the demo's three hospital folders from IXI-HH
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

DEFAULT_DATA = Path(os.environ.get("FEDWARD_DATA", "../shared/data"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="fedward", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="train a federation (the federated-training flow)")
    r.add_argument("spec", help="federation spec (YAML), e.g. federations/ixi-brain.yaml")
    r.add_argument("--summary", help="also write the per-site comparison as JSON here")
    r.add_argument("--workdir", help="where workspaces are created (default .fedward/runs)")
    p = sub.add_parser("prepare-ixi", help="split IXI-HH into the demo's three simulated hospitals")
    p.add_argument("--source", default=str(DEFAULT_DATA / "ixi-hh"))
    p.add_argument("--out", default=".fedward/sites")
    args = ap.parse_args(argv)

    if args.cmd == "prepare-ixi":
        from flows.demo_data import prepare_ixi_sites

        folders = prepare_ixi_sites(Path(args.source), Path(args.out))
        for site, folder in folders.items():
            print(f"{site}: {folder}")
        return 0

    from flows.federated_training import USER_ERRORS, check_port_free, federated_training
    from sitekit.spec import load_spec

    try:
        # The same checks the flow starts with, first here: a typo answers in a second, in one
        # sentence, without starting Prefect.
        check_port_free.fn(load_spec(args.spec))
    except USER_ERRORS as exc:
        print(f"fedward: {exc}", file=sys.stderr)
        return 2
    try:
        federated_training(args.spec, summary_path=args.summary, workdir=args.workdir)
    except USER_ERRORS as exc:
        print(f"fedward: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
