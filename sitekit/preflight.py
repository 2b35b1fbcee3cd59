"""``sitekit preflight``: prove, before any training, that this site can take part, and say what IT must allow.

Checks, in order, each with a PASS / FAIL / WARN / SKIP verdict:

1. bundle      the fetched bundle still matches its published fingerprint; whether it is approved;
2. identity    this site's key matches the certificate the federation signed, issued by the federation CA;
3. data        every case readable, image/label pairs consistent; aggregate counts and label balance only;
4. privacy     DICOM headers carry no patient identifiers (:func:`sitekit.deid.scan_dicom_folder`),
               naming the tag and the file when they do;
5. network     reach the aggregator through the configured HTTPS proxy (HTTP CONNECT), complete the
               mutual-TLS handshake with the federation CA, compare the aggregator's certificate with
               the one the federation announced, measure latency and (where the training engine is
               installed) upload throughput over the federation's own gRPC channel.

It prints a readable report, writes it as text and JSON to ``preflight/`` in the site's folder,
and writes ``preflight/allow-list-request.txt`` for the hospital's security team. Nothing in the
report names a patient: data results are counts, privacy findings name a file and a tag, never a value.
"""
from __future__ import annotations

import datetime as dt
import json
import os
import socket
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from sitekit import bundle as B
from sitekit import sitehome as H
from sitekit.layout import participant_layout

PASS, FAIL, WARN, SKIP = "PASS", "FAIL", "WARN", "SKIP"
CHECKS = ("bundle", "identity", "data", "privacy", "network")
MAX_FINDINGS_SHOWN = 20


@dataclass
class Check:
    name: str
    status: str = PASS
    lines: list[str] = field(default_factory=list)
    ask_it: str | None = None
    figures: dict = field(default_factory=dict)

    def fail(self, line: str, ask_it: str | None = None) -> "Check":
        self.status, self.ask_it = FAIL, ask_it or self.ask_it
        self.lines.append(line)
        return self


def _fingerprint_pem(pem: bytes) -> str:
    from sitekit.pki import fingerprint

    return fingerprint(pem)


# --------------------------------------------------------------------------- the checks

def check_bundle(home: Path) -> tuple[Check, dict | None, dict[str, bytes] | None]:
    c = Check("bundle")
    try:
        manifest, files = H.verified_bundle(home)
    except (H.SiteError, B.BundleError) as exc:
        return c.fail(str(exc)), None, None
    c.lines.append(f"bundle {B.installed_fingerprint(H.bundle_dir(home))} verified: {len(manifest['files'])} files, "
                   f"federation '{manifest['federation']}', site '{manifest['site']}'")
    c.lines.append(f"plan SHA-256 {manifest['plan_sha256']}")
    image = json.loads(files[B.IMAGE])
    c.lines.append(f"image {image['reference']} ({image.get('digest') or image.get('id')})" if image.get("reference")
                   else f"image: none ({image.get('note', 'no image for this plan')})")
    try:
        approval, _, _ = H.check_approval(home)
        c.lines.append(f"approved by {approval['approved_by']} at {approval['approved_at']}")
    except H.ApprovalError as exc:
        c.status = WARN
        c.lines.append(f"not approved yet: {exc}")
    return c, manifest, files


def check_identity(home: Path, site: str, files: dict[str, bytes]) -> Check:
    from cryptography import x509

    c = Check("identity")
    cert_pem = files[B.site_cert_path(site)]
    try:
        H.check_key_matches(home, site, cert_pem)
    except H.SiteError as exc:
        return c.fail(str(exc))
    cert = x509.load_pem_x509_certificate(cert_pem)
    ca = x509.load_pem_x509_certificate(files[B.CA_CERT])
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, Exception) as exc:  # InvalidSignature has no message
        return c.fail(f"site '{site}': the certificate in the bundle is not issued by the bundle's federation CA "
                      f"({type(exc).__name__}); ask the federation for a new bundle.")
    days = (cert.not_valid_after_utc - dt.datetime.now(dt.timezone.utc)).days
    c.lines.append(f"this site's key matches its certificate (CN={site}), issued by '{ca.subject.rfc4514_string()}'")
    c.lines.append(f"certificate valid for {days} more days")
    if days < 14:
        c.status = WARN
        c.lines.append("the certificate expires within two weeks: send a new certificate request to the federation")
    return c


def check_data(settings: H.SiteSettings, task: dict) -> Check:
    from sitekit.data import DataError

    c = Check("data")
    kind = task.get("kind", "segmentation")
    try:
        if kind == "segmentation":
            from sitekit.data import inspect_site

            s = inspect_site(settings.site, settings.data)
            c.figures = {"train_cases": s.train_cases, "test_cases": s.test_cases,
                         "foreground_fraction": round(s.foreground_fraction, 4)}
            c.lines.append(f"{s.train_cases} training and {s.test_cases} held-out test cases, every image readable and "
                           "consistent with its label")
            c.lines.append(f"label balance: on average {100 * s.foreground_fraction:.1f}% of a training volume is foreground")
        else:
            try:
                from sitekit.tabular import inspect_site
            except ImportError as exc:
                return c.fail(f"the {kind} data check needs the full sitekit ({exc.name} is not installed here); run "
                              "preflight from the collaborator image built with the full profile.")
            s = inspect_site(settings.site, settings.data)
            c.figures = dict(s)
            c.lines.append(f"{s['train_cases']} training and {s['test_cases']} held-out test rows "
                           f"({s['dropped_rows']} rows left out for a missing value)")
            c.lines.append(f"label balance: {100 * s['positive_fraction']:.1f}% of training rows are positive")
    except DataError as exc:
        return c.fail(str(exc))
    c.lines.append("only these aggregate counts leave the site")
    return c


def _has_dicom(folder: Path, limit: int = 100000) -> bool:
    """True if any file under ``folder`` looks like DICOM (a .dcm name, or 'DICM' at byte 128)."""
    seen = 0
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            seen += 1
            if seen > limit:
                return True  # too many to sniff: let the scanner decide
            p = Path(root) / name
            if name.lower().endswith((".dcm", ".dicom")):
                return True
            try:
                with open(p, "rb") as f:
                    f.seek(128)
                    if f.read(4) == b"DICM":
                        return True
            except OSError:
                continue
    return False


def check_privacy(settings: H.SiteSettings) -> Check:
    c = Check("privacy")
    folders = []
    if settings.dicom is not None:
        folders.append(settings.dicom)
    if settings.data.is_dir() and _has_dicom(settings.data):
        folders.append(settings.data)
    if not folders:
        c.lines.append(f"no DICOM files in the data folder and no 'dicom' folder in data.yaml: no headers to scan")
        return c
    try:
        from sitekit.deid import scan_dicom_folder
    except ImportError:
        return c.fail("this sitekit has no DICOM de-identification scanner (sitekit.deid is missing), so DICOM headers "
                      f"in {', '.join(map(str, folders))} cannot be checked for patient identifiers; install a sitekit "
                      "that includes it (the privacy check refuses rather than passes unchecked data).")
    total = 0
    for folder in folders:
        try:
            findings = scan_dicom_folder(settings.site, folder)
        except ValueError as exc:  # deid.DeidError: the folder could not be scanned
            return c.fail(str(exc))
        total += len(findings)
        if findings:
            c.status = FAIL
            files = sorted({f.file for f in findings})
            c.lines.append(f"{folder}: {len(findings)} identifier(s) in {len(files)} file(s); this data is not "
                           "de-identified and must not be used:")
            for f in findings[:MAX_FINDINGS_SHOWN]:
                c.lines.append("  " + (f.describe() if hasattr(f, "describe") else f"{f.file}: {f.tag} ({f.kind})"))
            if len(findings) > MAX_FINDINGS_SHOWN:
                c.lines.append(f"  ... and {len(findings) - MAX_FINDINGS_SHOWN} more")
        else:
            c.lines.append(f"{folder}: DICOM headers carry no patient identifiers")
    c.figures = {"findings": total}
    if c.status == FAIL:
        c.ask_it = None
    return c


def check_network(home: Path, settings: H.SiteSettings, pre: dict, files: dict[str, bytes],
                  timeout: float = 5.0, measure: bool = True) -> Check:
    from sitekit.netcheck import NetworkProblem, mtls_handshake, proxy_for

    c = Check("network")
    host, port = pre["aggregator"]["host"], int(pre["aggregator"]["port"])
    proxy = proxy_for(host, settings.proxy)
    c.figures["proxy"] = proxy
    c.lines.append(f"aggregator {host}:{port}, " + (f"through the HTTPS proxy {proxy}" if proxy else "direct (no proxy configured)"))
    paths = participant_layout(Path(home), "site", settings.site)
    ca_file = H.bundle_dir(home) / B.CA_CERT
    cert_file = H.bundle_dir(home) / B.site_cert_path(settings.site)
    handshakes = []
    try:
        for _ in range(int(pre.get("network", {}).get("handshakes", 3))):
            handshakes.append(mtls_handshake(host, port, str(ca_file), str(cert_file), str(paths["key"]), proxy, timeout))
    except NetworkProblem as exc:
        return c.fail(exc.what, exc.ask_it)
    first = handshakes[0]
    expected = pre.get("certificates", {}).get("aggregator_sha256")
    if expected and first["aggregator_fingerprint"] != expected:
        return c.fail(f"the aggregator presented certificate {first['aggregator_fingerprint']}, not the one the federation "
                      f"announced ({expected})", f"check that nothing between this machine and {host}:{port} replaces "
                      "certificates (TLS inspection must be off for this destination)")
    setup_ms = sorted(1000 * (h["connect_s"] + h.get("tunnel_s", 0.0) + h["handshake_s"]) for h in handshakes)
    c.figures.update({"tls_version": first["tls_version"], "aggregator_sha256": first["aggregator_fingerprint"],
                      "connection_setup_ms_median": setup_ms[len(setup_ms) // 2]})
    c.lines.append(f"mutual TLS ({first['tls_version']}) completed with the federation CA; the aggregator's certificate "
                   f"is the announced one ({first['aggregator_fingerprint'][:23]}...)")
    c.lines.append(f"connection set-up (TCP{' + proxy CONNECT' if proxy else ''} + TLS handshake): median "
                   f"{setup_ms[len(setup_ms) // 2]:.1f} ms over {len(setup_ms)} tries")
    if not measure:
        return c
    try:
        from sitekit.engine.openfl_adapter import measure_link
    except ImportError as exc:
        c.lines.append(f"throughput not measured: the training engine is not installed here ({exc.name} missing; "
                       "the slim sitekit-core image); run preflight from the full collaborator image to measure it")
        return c
    _install_workspace(home, settings, files)
    env = _proxy_env(proxy)
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        nbytes = int(pre.get("network", {}).get("throughput_probe_bytes", 4 << 20))
        link = measure_link(Path(home), settings.site, payload_bytes=nbytes, timeout=max(30.0, timeout))
    except (ConnectionError, PermissionError) as exc:
        return c.fail(f"the handshake worked but the federation's gRPC channel did not: {exc}",
                      f"check that the proxy passes long-lived HTTP/2 connections to {host}:{port} unchanged")
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    c.figures.update({"rtt_ms": round(link["rtt_ms"], 2), "upload_mbit_s": round(link["upload_mbit_s"], 1)})
    c.lines.append(f"gRPC round trip to the aggregator: median {link['rtt_ms']:.1f} ms")
    c.lines.append(f"upload: {size(link['upload_bytes'])} in {link['upload_seconds']:.2f} s "
                   f"= {link['upload_mbit_s']:.0f} Mbit/s")
    per_round = pre.get("traffic", {}).get("upload_bytes_per_round", 0) + pre.get("traffic", {}).get("download_bytes_per_round", 0)
    if per_round and link["upload_mbit_s"] > 0:
        c.lines.append(f"a round moves about {size(per_round)}: about {per_round * 8 / 1e6 / link['upload_mbit_s']:.2f} s "
                       "of transfer at this rate")
    return c


def size(n: float) -> str:
    """Bytes in words a security team reads: 12.3 MB, 85 kB."""
    for unit, factor in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= factor:
            return f"{n / factor:.1f} {unit}"
    return f"{n:.0f} bytes"


def _proxy_env(proxy: str | None) -> dict[str, str]:
    if not proxy:
        return {}
    return {"https_proxy": proxy, "grpc_proxy": proxy}


def _install_workspace(home: Path, settings: H.SiteSettings, files: dict[str, bytes]) -> None:
    """Put the approved (or, for preflight, the verified) bundle's files where the engine reads them."""
    home = Path(home)
    paths = participant_layout(home, "site", settings.site)
    for name, dest in ((B.PLAN, home / "plan" / "plan.yaml"), (B.COLS, home / "plan" / "cols.yaml"),
                       (B.CA_CERT, paths["chain"]), (B.site_cert_path(settings.site), paths["cert"])):
        H.atomic_write(dest, files[name])
    H.atomic_write(home / "plan" / "data.yaml", f"{settings.site},{settings.data}\n")


# --------------------------------------------------------------------------- report

def allow_list_request(pre: dict, manifest: dict, files: dict[str, bytes], network: Check | None) -> str:
    """The text hospital IT sends its security team: destination, port, protocol, direction, certificates, volume."""
    agg = pre["aggregator"]
    certs = pre.get("certificates", {})
    traffic = pre.get("traffic", {})
    site = manifest["site"]
    proxy = (network.figures.get("proxy") if network else None) or "(the hospital's HTTPS proxy)"
    down, up = traffic.get("download_bytes_per_round", 0), traffic.get("upload_bytes_per_round", 0)
    rounds = traffic.get("rounds", 0)
    lines = [
        f"ALLOW-LIST REQUEST: federated learning, federation '{manifest['federation']}', site '{site}'",
        f"prepared by sitekit preflight on {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC, host {socket.gethostname()}",
        "",
        f"Destination (FQDN)     : {agg['host']}",
        f"Port                   : {agg['port']}/TCP",
        f"Protocol               : {agg.get('protocol', 'gRPC over HTTP/2 inside TLS 1.2+ with mutual TLS')}",
        "Direction              : OUTBOUND ONLY, from this machine to the destination. Nothing connects",
        "                         into the hospital; no inbound rule is needed.",
        f"Route                  : through {proxy} using HTTP CONNECT to {agg['host']}:{agg['port']} only",
        "TLS inspection         : must be OFF for this destination: the site authenticates with its own",
        "                         client certificate (mutual TLS), which an inspecting proxy would strip.",
        "Connections            : one long-lived connection per training run; reconnects if dropped.",
        "",
        "Certificates (SHA-256 fingerprints):",
        f"  aggregator (server)  : {certs.get('aggregator_sha256', '?')}",
        f"  federation CA        : {certs.get('ca_sha256') or _fingerprint_pem(files[B.CA_CERT])}",
        f"  this site (client)   : {_fingerprint_pem(files[B.site_cert_path(site)])}",
        "",
        "Expected traffic:",
        f"  per round            : about {size(down)} in (the shared model) and {size(up)} out "
        "(this site's model update and aggregate metrics)",
        f"  rounds               : {rounds}, so about {size((down + up) * rounds)} in all",
        "  content              : model weights and aggregate metrics only; no images, no patient data",
        "",
        f"Plan SHA-256 (what the site administrator approves): {manifest['plan_sha256']}",
    ]
    return "\n".join(lines) + "\n"


def render(checks: list[Check], header: list[str]) -> str:
    out = header + [""]
    for c in checks:
        out.append(f"[{c.status}] {c.name}")
        out += [f"       {line}" for line in c.lines]
        if c.ask_it and c.status == FAIL:
            out.append(f"       -> ask IT to: {c.ask_it}")
    failed = [c.name for c in checks if c.status == FAIL]
    skipped = [c.name for c in checks if c.status == SKIP]
    out.append("")
    if failed or skipped:
        why = [f"{', '.join(failed)} failed"] if failed else []
        why += [f"{', '.join(skipped)} not checked"] if skipped else []
        out.append(f"RESULT: NOT READY ({'; '.join(why)})")
    else:
        out.append("RESULT: READY to join")
    return "\n".join(out) + "\n"


def run_preflight(home: Path, skip: tuple[str, ...] = (), out_dir: Path | None = None, timeout: float = 5.0,
                  measure: bool = True) -> tuple[bool, str, Path, Path | None]:
    """Run every check; print nothing, return (ready, report text, report folder, the allow-list
    request written, or None: it needs the fetched bundle)."""
    home = Path(home).resolve()
    out_dir = Path(out_dir) if out_dir else home / H.REPORTS
    checks: list[Check] = []
    started = time.monotonic()
    bcheck, manifest, files = check_bundle(home)
    checks.append(bcheck)
    settings = None
    try:
        settings = H.load_settings(home)
        if manifest and settings.site != manifest["site"]:
            raise H.SiteError(f"{home / H.SETTINGS}: field 'site' is '{settings.site}' but the bundle is for site "
                              f"'{manifest['site']}'; fix data.yaml or fetch this site's bundle.")
    except H.SiteError as exc:
        checks.append(Check("settings").fail(str(exc)))
        settings = None
    pre = yaml.safe_load(files[B.PREFLIGHT]) if files else None
    for name in CHECKS[1:]:
        if name in skip:
            checks.append(Check(name, SKIP, ["skipped (--skip)"]))
        elif files is None or settings is None:
            checks.append(Check(name, SKIP, ["not run: the bundle or data.yaml is not usable (see above)"]))
        elif name == "identity":
            checks.append(check_identity(home, settings.site, files))
        elif name == "data":
            checks.append(check_data(settings, pre.get("task", {})))
        elif name == "privacy":
            checks.append(check_privacy(settings))
        elif name == "network":
            checks.append(check_network(home, settings, pre, files, timeout, measure))
    ready = not any(c.status in (FAIL, SKIP) for c in checks)  # a skipped check proves nothing
    header = [f"sitekit preflight, {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M:%S} UTC, folder {home}"]
    if manifest:
        header.append(f"federation '{manifest['federation']}', site '{manifest['site']}'")
    text = render(checks, header)
    out_dir.mkdir(parents=True, exist_ok=True)
    H.atomic_write(out_dir / "report.txt", text)
    H.atomic_write(out_dir / "report.json", json.dumps({"ready": ready, "seconds": round(time.monotonic() - started, 2),
                                                         "checks": [asdict(c) for c in checks]}, indent=2) + "\n")
    request = None
    if manifest and pre:
        net = next((c for c in checks if c.name == "network" and c.status != SKIP), None)
        request = out_dir / "allow-list-request.txt"
        H.atomic_write(request, allow_list_request(pre, manifest, files, net))
    return ready, text, out_dir, request
