"""A hospital's sitekit folder ("site home"): what lives where, the site's settings, the approval.

One folder per site, owned by the hospital (e.g. ``/srv/fedward``)::

    cert/client/col_<site>.key   this site's private key (``sitekit keygen``; mode 0600; never leaves)
    cert/client/col_<site>.csr   its certificate request: the one file the site sends the federation
    bundle/                      what the federation shipped, as verified by ``sitekit fetch``
    data.yaml                    the site's own settings (data folder, DICOM folder, proxy): edit it
    approval.json                the administrator's approval of one exact plan (``sitekit approve``)
    approvals.log                every approval ever given, one JSON line each
    preflight/                   ``sitekit preflight``'s report and the allow-list request
    plan/, cert/                 what ``sitekit join`` installs from the approved bundle for the engine

Nothing here is sent anywhere by sitekit except the CSR (by the site) and, during training,
model updates and aggregate metrics.
"""
from __future__ import annotations

import datetime as dt
import getpass
import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import yaml

from sitekit import bundle as B
from sitekit import yamlio
from sitekit.audit import AuditLog
from sitekit.layout import participant_layout

BUNDLE_DIR = "bundle"
SETTINGS = "data.yaml"
APPROVAL = "approval.json"
APPROVALS_LOG = "approvals.log"
REPORTS = "preflight"
SETTING_FIELDS = {"site", "data", "dicom", "proxy"}


class SiteError(ValueError):
    """Something in the site's folder is missing or wrong; the message names the file and what to do."""


class ApprovalError(SiteError):
    """The plan was not approved, or changed after its approval."""


@dataclass(frozen=True)
class SiteSettings:
    site: str
    data: Path
    dicom: Path | None = None
    proxy: str | None = None


def atomic_write(path: Path, data: bytes | str, mode: int = 0o644) -> None:
    """Write to a temporary file beside ``path`` and rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def data_template(site: str) -> str:
    """The data.yaml a site fills in (shipped in its bundle as data.yaml.template)."""
    return (f"# Settings of site '{site}' for fedward. This file stays at the site: edit it, then run\n"
            "# 'sitekit preflight'. Paths are as this machine (or the container) sees them.\n"
            f"site: {site}\n"
            "data: /data            # folder with imagesTr/ labelsTr/ imagesTs/ labelsTs/ (or the site's table)\n"
            "dicom: null            # optional: the DICOM folder the data was made from, checked for identifiers\n"
            "proxy: null            # optional: the hospital's HTTPS proxy, e.g. http://proxy.hospital.org:3128\n"
            "                       # (default: the https_proxy environment variable)\n")


def load_settings(home: Path) -> SiteSettings:
    """Read the site's data.yaml; every problem is one sentence naming the file and the field."""
    path = Path(home) / SETTINGS
    if not path.exists():
        raise SiteError(f"{path} does not exist; copy {BUNDLE_DIR}/{B.DATA_TEMPLATE} there (sitekit fetch does it) "
                        "and set 'data' to this site's data folder.")
    try:
        raw = yamlio.load(path.read_text())
    except yaml.YAMLError as exc:
        where, what = yamlio.problem(exc)
        raise SiteError(f"{path} is not valid YAML{where} ({what}); fix it.") from None
    except UnicodeDecodeError:
        raise SiteError(f"{path} is not UTF-8 text; save it as UTF-8 YAML.") from None
    if not isinstance(raw, dict):
        raise SiteError(f"{path} must be a mapping with 'site' and 'data'.")
    unknown = set(raw) - SETTING_FIELDS
    if unknown:
        raise SiteError(f"{path}: field '{sorted(map(str, unknown))[0]}' is not a known field (known: {', '.join(sorted(SETTING_FIELDS))}).")
    for field in ("site", "data"):
        if raw.get(field) is not None and not isinstance(raw[field], str):
            raise SiteError(f"{path}: field '{field}' must be text (a {'site name' if field == 'site' else 'folder path'}), "
                            f"got a {type(raw[field]).__name__}; fix it.")
        if not isinstance(raw.get(field), str) or not raw[field].strip():
            raise SiteError(f"{path}: field '{field}' is missing or empty; set it.")
    base = path.parent

    def folder(value, field):
        if value is None:
            return None
        if not isinstance(value, str):
            raise SiteError(f"{path}: field '{field}' must be a folder path, got {value!r}.")
        p = Path(os.path.expandvars(value)).expanduser()
        return p if p.is_absolute() else (base / p)

    proxy = raw.get("proxy")
    if proxy is not None and not isinstance(proxy, str):
        raise SiteError(f"{path}: field 'proxy' must be a URL such as http://proxy.hospital.org:3128, got {proxy!r}.")
    return SiteSettings(site=raw["site"].strip(), data=folder(raw["data"], "data"), dicom=folder(raw.get("dicom"), "dicom"),
                        proxy=proxy or None)


def bundle_dir(home: Path) -> Path:
    return Path(home) / BUNDLE_DIR


def verified_bundle(home: Path, fingerprint: str | None = None) -> tuple[dict, dict[str, bytes]]:
    """Re-read the bundle folder and check every byte against ``fingerprint`` (default: the one fetch
    verified); return (manifest, files)."""
    folder = bundle_dir(home)
    fp = fingerprint or B.installed_fingerprint(folder)
    if fp is None:
        raise SiteError(f"no fetched bundle in {folder}; run 'sitekit fetch' first.")
    files = B.read_folder(folder) if folder.is_dir() else {}
    if not files:
        raise SiteError(f"no fetched bundle in {folder}; run 'sitekit fetch' first.")
    return B.verify_files(files, fp), files


def check_key_matches(home: Path, site: str, cert_pem: bytes) -> Path:
    """The certificate the federation signed must be for the key this site holds; return the key's path."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    key_path = participant_layout(Path(home), "site", site)["key"]
    if not key_path.exists():
        raise SiteError(f"site '{site}': no private key at {key_path}; run 'sitekit keygen --workspace {home} --role site "
                        f"--name {site}' and send the federation the certificate request (.csr) it writes.")
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    cert = x509.load_pem_x509_certificate(cert_pem)
    pub = serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(serialization.Encoding.DER, pub) != cert.public_key().public_bytes(serialization.Encoding.DER, pub):
        raise SiteError(f"site '{site}': the certificate in the bundle was not signed for this site's key ({key_path}); "
                        "was keygen run again after the request was sent? Send the current .csr to the federation.")
    return key_path


def approve(home: Path, by: str, plan_sha256: str | None = None) -> dict:
    """Record that ``by`` approved the fetched plan, atomically, with who and when.

    ``plan_sha256``, if given, is the hash the administrator reviewed: the approval is refused
    unless the fetched plan has exactly that hash."""
    if not by or not by.strip():
        raise ApprovalError("say who approves: --by 'NAME, ROLE'.")
    manifest, files = verified_bundle(home)
    if plan_sha256 and plan_sha256.strip().lower() != manifest["plan_sha256"]:
        raise ApprovalError(f"the fetched plan has SHA-256 {manifest['plan_sha256']}, not the {plan_sha256.strip()} you "
                            "reviewed; nothing was approved. Review the fetched plan (bundle/plan/plan.yaml).")
    image = json.loads(files[B.IMAGE])
    record = {
        "federation": manifest["federation"], "site": manifest["site"],
        "plan_sha256": manifest["plan_sha256"], "bundle_fingerprint": B.installed_fingerprint(bundle_dir(home)),
        "image": image, "approved_by": by.strip(), "os_user": getpass.getuser(), "host": socket.gethostname(),
        "approved_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    text = json.dumps(record, indent=2) + "\n"
    atomic_write(Path(home) / APPROVAL, text)
    # the history, hash-chained (sitekit/audit.py: 'fedward audit-log verify' checks it); approval.json is the one in force
    AuditLog(Path(home) / APPROVALS_LOG).append("approval", **record)
    return record


def check_approval(home: Path) -> tuple[dict, dict, dict[str, bytes]]:
    """The approval in force and the bundle it approved, re-verified byte for byte.

    Refuses (ApprovalError) when nothing was approved, or when the fetched bundle or plan is not
    the one approved."""
    path = Path(home) / APPROVAL
    if not path.exists():
        raise ApprovalError(f"the plan has not been approved at this site ({path} does not exist); the site "
                            "administrator reviews it and runs 'sitekit approve --by NAME'.")
    try:
        approval = json.loads(path.read_text())
        fp, approved_plan = approval["bundle_fingerprint"], approval["plan_sha256"]
    except (ValueError, KeyError):
        raise ApprovalError(f"{path} is not an approval written by 'sitekit approve'; approve again.") from None
    current = B.installed_fingerprint(bundle_dir(home))
    try:
        manifest, files = verified_bundle(home, fp)
    except B.BundleError as exc:
        raise ApprovalError(f"the bundle changed after it was approved by {approval.get('approved_by')} on "
                            f"{approval.get('approved_at')} ({exc}) Review it and run 'sitekit approve' again.") from None
    if current and current != fp:
        raise ApprovalError(f"a new bundle ({current[:16]}...) was fetched after the approval of {fp[:16]}...; "
                            "review it and run 'sitekit approve' again.")
    if manifest["plan_sha256"] != approved_plan:
        raise ApprovalError(f"the plan changed after it was approved (approved {approved_plan[:16]}..., now "
                            f"{manifest['plan_sha256'][:16]}...); review it and run 'sitekit approve' again.")
    return approval, manifest, files
