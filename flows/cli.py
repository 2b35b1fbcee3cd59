"""``fedward``: the MLOps engineer's command line.

- ``fedward run SPEC [--summary PATH]``   run the ``federated-training`` flow for a federation spec
- ``fedward prepare-ixi``                  build the demo's three hospital folders from IXI-HH
- ``fedward audit-log verify PATH``        check a run's audit log: any edited, deleted or reordered record
- ``fedward dpia-annex SPEC``              write the federation's DPIA technical annex (Markdown and PDF)
- ``fedward deploy``                       register the Prefect deployments of flows/deployments.py
- ``fedward build-images SPEC``            the ``build-site-images`` flow (needs DOCKER_HOST)
- ``fedward invite-sites SPEC``            the ``invite-sites`` flow: a private upload link per site for its CSR
- ``fedward ship SPEC [--csr SITE=PATH ...]`` the ``ship-plan`` flow: sign (the uploaded requests, or
                                           the given files), bundle, upload to S3
- ``fedward prepare-pneumonia``            split PneumoniaMNIST into the privacy benchmark's three hospitals
- ``fedward privacy-sweep SPEC --noise 0,0.5,1,2``  the same federation at several noise levels (ε vs metric)
- ``fedward audit SPEC --site NAME``       gradient-inversion audit of what that site would share, run at the site
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
    a = sub.add_parser("audit-log", help="tamper-evident audit logs")
    a_sub = a.add_subparsers(dest="audit_cmd", required=True)
    v = a_sub.add_parser("verify", help="check every record's hash and link; name any edited, deleted or reordered record")
    v.add_argument("path", help="the audit log (audit/audit.jsonl of an MLflow run, <workspace>/aggregator/audit.jsonl, or a site's approvals.log)")
    v.add_argument("--head", help="the hash the last record must have (MLflow run tag fedward.audit.head): "
                                  "also catches records removed from the end")
    d = sub.add_parser("dpia-annex", help="write the DPIA technical annex of a federation")
    d.add_argument("spec", help="federation spec (YAML)")
    d.add_argument("--out", help="Markdown file to write (default .fedward/dpia/<federation>-annex.md); a PDF is written beside it")
    d.add_argument("--no-pdf", action="store_true", help="Markdown only")
    dep = sub.add_parser("deploy", help="create or update the Prefect deployments declared in flows/deployments.py")
    dep.add_argument("--pool", default="fedward", help="process work pool (created if missing; default fedward)")
    dep.add_argument("--only", action="append", help="deploy only this deployment (repeatable)")
    b = sub.add_parser("build-images", help="build the aggregator image and one collaborator image per site")
    b.add_argument("spec")
    b.add_argument("--profile", choices=["full", "core"], default="full")
    b.add_argument("--base-image", help="an image already in the store to build FROM (default: one from debootstrap)")
    b.add_argument("--rootfs", help="the debootstrap root filesystem tar (default .tools/images/debian-bookworm-python.tar)")
    b.add_argument("--out", default="images.json", help="where to write the images' references and digests")
    inv = sub.add_parser("invite-sites", help="give each site a private upload link for its certificate request (invite-sites flow)")
    inv.add_argument("spec")
    inv.add_argument("--bucket", default="fedward-bundles")
    inv.add_argument("--s3-endpoint", help="S3 endpoint URL (default FEDWARD_S3_ENDPOINT, else AWS)")
    inv.add_argument("--workdir", help="the federation's folder (default .fedward/federations/<federation>)")
    sh = sub.add_parser("ship", help="ship every site its bundle through S3 (the ship-plan flow)")
    sh.add_argument("spec")
    sh.add_argument("--csr", action="append", metavar="SITE=PATH",
                    help="a site's certificate request, repeatable (omit: collect the requests the sites uploaded "
                         "with their invite-sites links)")
    sh.add_argument("--images", help="images.json from 'fedward build-images' (omit: sites run sitekit without an image)")
    sh.add_argument("--bucket", default="fedward-bundles")
    sh.add_argument("--s3-endpoint", help="S3 endpoint URL (default FEDWARD_S3_ENDPOINT, else AWS)")
    sh.add_argument("--workdir", help="the federation's folder (default .fedward/federations/<federation>)")
    pp = sub.add_parser("prepare-pneumonia", help="split PneumoniaMNIST into three simulated hospitals")
    pp.add_argument("--source", default=str(DEFAULT_DATA / "medmnist" / "pneumoniamnist.npz"))
    pp.add_argument("--out", default=".fedward/sites-pneumonia")
    sw = sub.add_parser("privacy-sweep", help="run a federation at several noise levels; plot ε against the metric")
    sw.add_argument("spec", help="federation spec (YAML) with a privacy section, e.g. federations/pneumonia-dp.yaml")
    sw.add_argument("--noise", required=True, help="comma-separated noise multipliers; 0 = without privacy, e.g. 0,0.5,1,2")
    sw.add_argument("--summary", help="also write the sweep's table as JSON here")
    sw.add_argument("--workdir", help="where workspaces are created (default .fedward/runs)")
    au = sub.add_parser("audit", help="gradient-inversion audit of one site's shared update, run inside that site")
    au.add_argument("spec", help="federation spec (YAML)")
    au.add_argument("--site", required=True, help="the site to audit (its own process, its own folder)")
    au.add_argument("--workspace", help="a finished run's workspace: attack its global model instead of the initial one")
    au.add_argument("--batch-sizes", default="1,4,16")
    au.add_argument("--iterations", type=int, default=1500, help="attack iterations per reconstruction")
    au.add_argument("--summary", help="also write the audit's numbers as JSON here")
    args = ap.parse_args(argv)

    if args.cmd == "audit-log":
        from sitekit.audit import verify

        result = verify(args.path, expect_head=args.head)
        if result.ok:
            print(result.summary())
            return 0
        print(f"fedward: {args.path}: audit log FAILED verification ({len(result.problems)} problem(s)):", file=sys.stderr)
        for p in result.problems:
            print(f"  {p}", file=sys.stderr)
        return 1

    if args.cmd == "dpia-annex":
        from flows.dpia import annex_markdown, write_annex
        from sitekit.spec import SpecError, load_spec

        try:
            spec = load_spec(args.spec)
        except SpecError as exc:
            print(f"fedward: {exc}", file=sys.stderr)
            return 2
        out = Path(args.out) if args.out else Path(".fedward") / "dpia" / f"{spec.name}-annex.md"
        blocked = next((p for p in out.parents if p.exists() and not p.is_dir()), None)
        problem = (f"--out {out} is a folder; give the Markdown file to write, e.g. {out / (spec.name + '-annex.md')}"
                   if out.is_dir() else
                   f"--out {out} must be a Markdown file ending in .md (the PDF is written beside it)" if out.suffix.lower() != ".md"
                   else f"--out {out} cannot be written: {blocked} is a file, not a folder" if blocked else None)
        if problem:
            print(f"fedward: {problem}.", file=sys.stderr)
            return 2
        for path in write_annex(annex_markdown(spec), out, pdf=not args.no_pdf):
            print(path)
        return 0

    if args.cmd == "deploy":
        from flows.deployments import deploy_all

        for name, deployment_id in deploy_all(work_pool=args.pool, only=args.only).items():
            print(f"deployment {name}: {deployment_id}")
        return 0

    if args.cmd == "build-images":
        import json

        from flows.site_images import build_site_images

        result = build_site_images(args.spec, profile=args.profile, base_image=args.base_image, rootfs=args.rootfs)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"image references and digests: {args.out}")
        return 0
    if args.cmd == "invite-sites":
        from flows.ship_plan import invite_sites
        from sitekit.spec import SpecError, load_spec

        try:
            load_spec(args.spec)
        except SpecError as exc:
            print(f"fedward: {exc}", file=sys.stderr)
            return 2
        links = invite_sites(args.spec, bucket=args.bucket, s3_endpoint=args.s3_endpoint, workdir=args.workdir)
        print(f"send each site its upload link privately ({len(links)} sites; links/<site>-request.txt in the federation "
              "folder); each site runs 'sitekit keygen' and 'sitekit send-request --url LINK', then: fedward ship SPEC")
        return 0
    if args.cmd == "ship":
        import json

        from flows.ship_plan import ship_plan

        from sitekit import governance
        from sitekit.pki import PKIError
        from sitekit.spec import SpecError, load_spec

        try:  # answered in a second, without starting Prefect
            governance.require(load_spec(args.spec))
        except (SpecError, governance.GovernanceError) as exc:
            print(f"fedward: {exc}", file=sys.stderr)
            return 2
        bad = [c for c in args.csr or [] if "=" not in c or not all(c.split("=", 1))]
        if bad:
            print(f"fedward: --csr {bad[0]!r} must be SITE=PATH, e.g. --csr hospital-a=requests/col_hospital-a.csr.", file=sys.stderr)
            return 2
        csrs = dict(c.split("=", 1) for c in args.csr) if args.csr else None  # None: the uploaded requests
        try:
            images = json.loads(Path(args.images).read_text()) if args.images else None
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            why = exc.strerror if isinstance(exc, OSError) else "not JSON"
            print(f"fedward: --images {args.images} cannot be read ({why}); pass the images.json 'fedward build-images' "
                  "wrote, or leave --images out.", file=sys.stderr)
            return 2
        try:
            result = ship_plan(args.spec, csrs, images, bucket=args.bucket, s3_endpoint=args.s3_endpoint, workdir=args.workdir)
        except PKIError as exc:  # a request missing, or naming another site
            print(f"fedward: {exc}", file=sys.stderr)
            return 2
        for site, s in result["sites"].items():
            print(f"{site}: fingerprint {s['fingerprint']}  ({s['object']})")
        print("send each site its link privately (links/<site>.txt in the federation folder); publish the fingerprints")
        return 0

    if args.cmd == "prepare-pneumonia":
        from flows.pneumonia_data import prepare_pneumonia_sites

        try:
            folders = prepare_pneumonia_sites(Path(args.source), Path(args.out))
        except (FileNotFoundError, FileExistsError) as exc:
            print(f"fedward: {exc}", file=sys.stderr)
            return 2
        for site, folder in folders.items():
            print(f"{site}: {folder}")
        return 0
    if args.cmd == "privacy-sweep":
        return _privacy_sweep(args)
    if args.cmd == "audit":
        return _audit(args)

    if args.cmd == "prepare-ixi":
        from flows.demo_data import prepare_ixi_sites

        folders = prepare_ixi_sites(Path(args.source), Path(args.out))
        for site, folder in folders.items():
            print(f"{site}: {folder}")
        return 0

    from flows.federated_training import USER_ERRORS, check_port_free, federated_training
    from sitekit import governance
    from sitekit.spec import load_spec

    try:
        # The same checks the flow starts with, first here: a typo or a missing agreement answers
        # in a second, in one sentence, without starting Prefect.
        spec = load_spec(args.spec)
        governance.require(spec)
        check_port_free.fn(spec)
    except USER_ERRORS as exc:
        print(f"fedward: {exc}", file=sys.stderr)
        return 2
    try:
        federated_training(args.spec, summary_path=args.summary, workdir=args.workdir)
    except USER_ERRORS as exc:
        print(f"fedward: {exc}", file=sys.stderr)
        return 2
    return 0


def _privacy_sweep(args) -> int:
    from flows.federated_training import USER_ERRORS
    from flows.privacy_sweep import parse_noise_levels, privacy_sweep
    from sitekit.spec import load_spec

    try:
        load_spec(args.spec)
        levels = parse_noise_levels(args.noise)
    except USER_ERRORS as exc:
        print(f"fedward: {exc}", file=sys.stderr)
        return 2
    try:
        privacy_sweep(args.spec, levels, workdir=args.workdir, summary_path=args.summary)
    except USER_ERRORS as exc:
        print(f"fedward: {exc}", file=sys.stderr)
        return 2
    return 0


def _audit(args) -> int:
    from flows.audit import audit_flow
    from flows.federated_training import USER_ERRORS
    from sitekit.spec import SpecError, load_spec

    try:
        spec = load_spec(args.spec)
        if args.site not in spec.site_names:
            raise SpecError(f"{spec.path}: there is no site '{args.site}' (sites: {', '.join(spec.site_names)}).")
        sizes = [int(b) for b in args.batch_sizes.split(",")]
        if not sizes or min(sizes) < 1 or max(sizes) > 64:
            raise ValueError
    except ValueError as exc:
        msg = str(exc) or f"--batch-sizes must be comma-separated integers between 1 and 64, got {args.batch_sizes!r}"
        print(f"fedward: {msg}", file=sys.stderr)
        return 2
    try:
        audit_flow(args.spec, args.site, workspace=args.workspace, batch_sizes=sizes, iterations=args.iterations,
                   summary_path=args.summary)
    except USER_ERRORS as exc:
        print(f"fedward: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
