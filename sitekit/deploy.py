"""The commands hospital IT runs, in order: ``fetch`` -> ``preflight`` -> ``approve`` -> ``join``.

- ``sitekit send-request`` upload this site's certificate request (made by ``sitekit keygen``) with
                        the federation's link; the private key stays here
- ``sitekit fetch``     download this site's bundle (outbound HTTPS only), verify every byte against
                        the fingerprint the federation published, install it in the site's folder
- ``sitekit preflight`` check bundle, identity, data, privacy and network; write the report and the
                        allow-list request for the security team (see :mod:`sitekit.preflight`)
- ``sitekit approve``   record the site administrator's approval of the exact plan (who, when)
- ``sitekit join``      start training, only with the approved, unchanged plan

Exit codes: 0 done; 1 preflight not ready; 2 refused (bundle, approval or settings); 5 network
(the message says what to ask IT for); 3 data.
"""
from __future__ import annotations

import json
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

from sitekit import bundle as B
from sitekit import sitehome as H

EXIT_REFUSED = 2
EXIT_DATA = 3
EXIT_NETWORK = 5


def _download(url: str, timeout: float) -> bytes:
    """GET ``url`` (outbound; urllib honours https_proxy/http_proxy), bounded in time and size."""
    req = urllib.request.Request(url, headers={"User-Agent": "fedward-sitekit"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            data = r.read(B.MAX_BUNDLE_BYTES + 1)
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403):
            raise B.BundleError(f"the bundle link was refused ({exc.code} {exc.reason}): it has expired, was altered, or "
                                "belongs to another site; ask the federation for a fresh link for this site.") from None
        if exc.code == 404:
            raise B.BundleError("no bundle at that link (404); ask the federation for this site's current link.") from None
        raise B.BundleError(f"the bundle server answered {exc.code} {exc.reason}; try again later or ask the federation.") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ConnectionError(f"cannot download the bundle ({reason}). Ask your IT team to allow outbound HTTPS from this "
                              "machine to the bundle's host (or give you the HTTPS proxy address: set https_proxy).") from None
    if len(data) > B.MAX_BUNDLE_BYTES:
        raise B.BundleError("the download is far larger than a bundle; refusing it.")
    return data


def fetch(home: Path, fingerprint: str, url: str | None = None, file: Path | None = None, timeout: float = 60.0) -> dict:
    """Fetch, verify and install this site's bundle into ``home``; return its manifest.

    Refuses a bundle that does not match ``fingerprint`` byte for byte, that is for another site,
    or whose certificate was not signed for the private key this site holds."""
    home = Path(home)
    B.normalise_fingerprint(fingerprint)  # a typo fails before any download
    data = Path(file).read_bytes() if file else _download(url, timeout)
    files = B.read_tar(data)
    manifest = B.verify_files(files, fingerprint)
    site = manifest["site"]
    if (home / H.SETTINGS).exists():
        settings = H.load_settings(home)
        if settings.site != site:
            raise H.SiteError(f"this bundle is for site '{site}', but {home / H.SETTINGS} says this is site "
                              f"'{settings.site}'; fetch your own site's bundle.")
    own = sorted(p.name[len("col_"):-len(".key")] for p in (home / "cert" / "client").glob("col_*.key"))
    if own and site not in own:
        raise H.SiteError(f"this bundle is for site '{site}', but this folder ({home}) belongs to site "
                          f"'{own[0]}'; fetch your own site's bundle.")
    H.check_key_matches(home, site, files[B.site_cert_path(site)])
    B.install(files, fingerprint, H.bundle_dir(home))
    if not (home / H.SETTINGS).exists():  # the site's own file: written once, never overwritten
        H.atomic_write(home / H.SETTINGS, files[B.DATA_TEMPLATE])
    return manifest


def send_request(home: Path, site: str, url: str, timeout: float = 60.0) -> Path:
    """Upload this site's certificate request (only the CSR, never the key) with the federation's link."""
    csr = H.participant_layout(Path(home), "site", site)["csr"]
    if not csr.exists():
        raise H.SiteError(f"site '{site}': no certificate request at {csr}; run 'sitekit keygen --workspace {home} "
                          f"--role site --name {site}' first.")
    data = csr.read_bytes()
    if b"PRIVATE KEY" in data or b"CERTIFICATE REQUEST" not in data:
        raise H.SiteError(f"{csr} is not a certificate request; refusing to send it.")
    req = urllib.request.Request(url, data=data, method="PUT", headers={"Content-Type": "application/pkcs10"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            r.read()
    except urllib.error.HTTPError as exc:
        raise H.SiteError(f"the upload link was refused ({exc.code} {exc.reason}): it has expired, was altered, or is "
                          "another site's; ask the federation for a fresh link.") from None
    except (urllib.error.URLError, OSError) as exc:
        raise ConnectionError(f"cannot upload the request ({getattr(exc, 'reason', exc)}). Ask your IT team to allow "
                              "outbound HTTPS to the link's host (or give you the HTTPS proxy: set https_proxy).") from None
    return csr


def join(home: Path, admission_timeout: float = 30.0, network_timeout: float = 5.0) -> int:
    """Start this site's collaborator with the approved plan; refuse anything else.

    Checks, before any process starts: the approval and the bundle byte for byte; that the image
    (if run in one) was built for this plan; data.yaml; and one bounded network handshake through
    the proxy, so an unreachable aggregator fails in seconds with what to ask IT for."""
    from sitekit.netcheck import NetworkProblem, mtls_handshake, proxy_for
    from sitekit.preflight import _install_workspace, _proxy_env

    import yaml

    home = Path(home).resolve()
    approval, manifest, files = H.check_approval(home)
    _check_image(manifest)
    settings = H.load_settings(home)
    if settings.site != manifest["site"]:
        raise H.SiteError(f"{home / H.SETTINGS}: field 'site' is '{settings.site}' but the approved bundle is for "
                          f"'{manifest['site']}'.")
    H.check_key_matches(home, settings.site, files[B.site_cert_path(settings.site)])
    pre = yaml.safe_load(files[B.PREFLIGHT])
    host, port = pre["aggregator"]["host"], int(pre["aggregator"]["port"])
    proxy = proxy_for(host, settings.proxy)
    key = H.participant_layout(home, "site", settings.site)["key"]
    try:
        mtls_handshake(host, port, str(H.bundle_dir(home) / B.CA_CERT), str(H.bundle_dir(home) / B.site_cert_path(settings.site)),
                       str(key), proxy, network_timeout)
    except NetworkProblem as exc:
        print(f"sitekit join: {exc}", file=sys.stderr, flush=True)
        return EXIT_NETWORK
    try:
        from sitekit.engine.openfl_adapter import run_collaborator
    except ImportError as exc:
        print(f"sitekit join: this sitekit has no training engine ({exc.name} is not installed: the slim sitekit-core "
              "image); run join from the full collaborator image.", file=sys.stderr)
        return EXIT_REFUSED
    _install_workspace(home, settings, files)
    os.environ.update(_proxy_env(proxy))
    print(f"joining federation '{manifest['federation']}' as site '{settings.site}' (plan {manifest['plan_sha256'][:16]}..., "
          f"approved by {approval['approved_by']} at {approval['approved_at']}) via "
          f"{proxy or 'a direct connection'} to {host}:{port}", flush=True)
    os.chdir(home)
    return run_collaborator(settings.site, admission_timeout=admission_timeout)


def _check_image(manifest: dict) -> None:
    """Inside a fedward image: it must have been built for the approved plan and this site."""
    info = os.environ.get("FEDWARD_IMAGE_INFO")
    if not info or not Path(info).exists():
        return
    built = json.loads(Path(info).read_text())
    if built.get("plan_sha256") != manifest["plan_sha256"] or built.get("site") != manifest["site"]:
        raise H.ApprovalError(f"this image was built for site '{built.get('site')}' and plan {str(built.get('plan_sha256'))[:16]}..., "
                              f"but the approved plan is {manifest['plan_sha256'][:16]}... for site '{manifest['site']}'; "
                              "run the image named in the bundle (image.json).")


# --------------------------------------------------------------------------- command line

def add_commands(sub) -> dict:
    """Add fetch / preflight / approve / join to the ``sitekit`` parser; return {name: handler}."""
    f = sub.add_parser("fetch", help="download this site's bundle and verify it against the published fingerprint")
    f.add_argument("--home", default=".", help="this site's sitekit folder (default: here)")
    src = f.add_mutually_exclusive_group(required=True)
    src.add_argument("--url", help="the bundle link the federation sent this site")
    src.add_argument("--file", help="a bundle file carried in by hand")
    f.add_argument("--fingerprint", required=True, help="the bundle fingerprint the federation published (SHA-256)")
    f.add_argument("--timeout", type=float, default=60.0)
    p = sub.add_parser("preflight", help="check bundle, identity, data, privacy and network; write the report")
    p.add_argument("--home", default=".")
    p.add_argument("--skip", action="append", default=[], choices=["identity", "data", "privacy", "network"])
    p.add_argument("--out", help="report folder (default: HOME/preflight)")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds for each network step (default 5)")
    a = sub.add_parser("approve", help="record the site administrator's approval of the fetched plan")
    a.add_argument("--home", default=".")
    a.add_argument("--by", required=True, help="who approves, e.g. 'J. Smith, head of radiology IT'")
    a.add_argument("--plan-sha256", help="the plan hash you reviewed (refused if the fetched plan differs)")
    r = sub.add_parser("send-request", help="upload this site's certificate request with the federation's link")
    r.add_argument("--home", default=".")
    r.add_argument("--site", required=True)
    r.add_argument("--url", required=True, help="the upload link the federation sent this site")
    j = sub.add_parser("join", help="start training with the approved plan")
    j.add_argument("--home", default=".")
    j.add_argument("--admission-timeout", type=float, default=30.0)
    j.add_argument("--network-timeout", type=float, default=5.0)
    return {"fetch": _cmd_fetch, "preflight": _cmd_preflight, "approve": _cmd_approve, "join": _cmd_join,
            "send-request": _cmd_send_request}


def _cmd_send_request(args) -> int:
    csr = send_request(Path(args.home), args.site, args.url)
    print(f"sent {csr} (the certificate request; the private key stays in {csr.parent})")
    return 0


def _cmd_fetch(args) -> int:
    m = fetch(Path(args.home), args.fingerprint, url=args.url, file=Path(args.file) if args.file else None, timeout=args.timeout)
    home = Path(args.home)
    print(f"bundle for site '{m['site']}' of federation '{m['federation']}' verified ({len(m['files'])} files, every "
          f"SHA-256 as published) and installed in {H.bundle_dir(home)}")
    print(f"plan SHA-256: {m['plan_sha256']}")
    print(f"next: set 'data' in {home / H.SETTINGS}, run 'sitekit preflight', then 'sitekit approve --by NAME'")
    return 0


def _cmd_preflight(args) -> int:
    from sitekit.preflight import run_preflight

    home = Path(args.home)
    if not home.is_dir():  # never create a mistyped site folder: the report would land where nobody looks
        raise H.SiteError(f"--home {home} " + ("is a file" if home.exists() else "does not exist")
                          + "; give this site's folder (where 'sitekit fetch' put the bundle and data.yaml).")
    ready, text, out, request = run_preflight(home, tuple(args.skip), Path(args.out) if args.out else None, args.timeout)
    sys.stdout.write(text)
    print(f"report: {out / 'report.txt'} (and report.json); "
          + (f"allow-list request: {request}" if request else
             "no allow-list request written this time: it needs the fetched bundle (run 'sitekit fetch' first)"))
    return 0 if ready else 1


def _cmd_approve(args) -> int:
    r = H.approve(Path(args.home), args.by, args.plan_sha256)
    print(f"approved: plan {r['plan_sha256']} of federation '{r['federation']}' for site '{r['site']}', "
          f"by {r['approved_by']} at {r['approved_at']} (recorded in {Path(args.home) / H.APPROVAL})")
    return 0


def _cmd_join(args) -> int:
    return join(Path(args.home), args.admission_timeout, args.network_timeout)


USER_ERRORS = (B.BundleError, H.SiteError, ConnectionError)
