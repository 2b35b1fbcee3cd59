"""A site bundle: everything the federation ships to one hospital, and how the hospital checks it.

A bundle is a small tar file holding, for one site:

- ``plan/plan.yaml``, ``plan/cols.yaml``  the federation's plan (byte-identical at every site) and
  the list of sites allowed to join;
- ``cert/cert_chain.crt``                  the federation CA certificate;
- ``cert/client/col_<site>.crt``           this site's certificate, signed from the request (CSR)
  the site made with ``sitekit keygen`` (the private key never left the site, and is never in a bundle);
- ``image.json``                           the container image to run (reference and digest);
- ``data.yaml.template``                   the site's settings file to fill in (data folder, proxy);
- ``preflight.yaml``                       what ``sitekit preflight`` checks against (aggregator host,
  port, certificate fingerprints, expected traffic per round);
- ``manifest.json``                        the SHA-256 of every file above.

The bundle's **fingerprint** is the SHA-256 of ``manifest.json``. The federation publishes it
apart from the bundle (by e-mail, on its web page, in MLflow); ``sitekit fetch`` refuses a
bundle whose manifest does not hash to it, or any file whose bytes do not hash to the manifest.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tarfile
import tempfile
from pathlib import Path, PurePosixPath

FORMAT = "fedward-bundle/1"
MANIFEST = "manifest.json"
PLAN = "plan/plan.yaml"
COLS = "plan/cols.yaml"
CA_CERT = "cert/cert_chain.crt"
IMAGE = "image.json"
DATA_TEMPLATE = "data.yaml.template"
PREFLIGHT = "preflight.yaml"
FINGERPRINT_FILE = "FINGERPRINT"  # written by fetch beside the bundle's files: what the site verified against
MAX_BUNDLE_BYTES = 64 * 1024 * 1024  # a bundle is a few kB; anything near this is not a bundle


class BundleError(ValueError):
    """A bundle is not what the federation published; the message says what differs and what to do."""


def site_cert_path(site: str) -> str:
    """Where a site's signed certificate sits in a bundle (and in the site's folder, where OpenFL reads it)."""
    return f"cert/client/col_{site}.crt"


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def plan_sha256(plan_bytes: bytes) -> str:
    """The plan's identity: SHA-256 of its exact bytes (the plan is byte-identical at every participant)."""
    return sha256_bytes(plan_bytes)


def manifest_bytes(federation: str, site: str, files: dict[str, bytes]) -> bytes:
    """The canonical manifest for ``files`` (sorted keys, fixed layout) so its hash is reproducible."""
    manifest = {"format": FORMAT, "federation": federation, "site": site,
                "plan_sha256": plan_sha256(files[PLAN]),
                "files": {name: sha256_bytes(data) for name, data in sorted(files.items())}}
    return (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()


def _check_no_private_key(name: str, data: bytes) -> None:
    if b"PRIVATE KEY" in data:
        raise BundleError(f"bundle file {name} holds a private key; a bundle must never carry one "
                          "(each participant keeps its own key).")


def pack(federation: str, site: str, files: dict[str, bytes]) -> tuple[bytes, str]:
    """A bundle tar for ``files`` (name -> bytes) with its manifest; returns (tar bytes, fingerprint).

    The tar is deterministic (sorted names, fixed owner and time), so the same inputs give the same bytes."""
    for name, data in files.items():
        _safe_name(name)
        _check_no_private_key(name, data)
    for required in (PLAN, COLS, CA_CERT, site_cert_path(site), IMAGE, DATA_TEMPLATE, PREFLIGHT):
        if required not in files:
            raise BundleError(f"bundle for site '{site}' lacks {required}.")
    manifest = manifest_bytes(federation, site, files)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in sorted({**files, MANIFEST: manifest}.items()):
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue(), sha256_bytes(manifest)


def _safe_name(name: str) -> str:
    p = PurePosixPath(name)
    if p.is_absolute() or ".." in p.parts or not p.parts or name != p.as_posix():
        raise BundleError(f"bundle holds an unsafe file name {name!r}; refusing it.")
    return name


def read_tar(data: bytes) -> dict[str, bytes]:
    """The regular files of a bundle tar; refuses links, devices and names that escape the folder."""
    if len(data) > MAX_BUNDLE_BYTES:
        raise BundleError(f"the download is {len(data)} bytes, far more than a bundle; refusing it.")
    files: dict[str, bytes] = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for member in tar.getmembers():
                if member.isdir():
                    continue
                if not member.isfile():
                    raise BundleError(f"bundle entry {member.name!r} is not a regular file; refusing the bundle.")
                name = _safe_name(member.name)
                if name in files:
                    raise BundleError(f"bundle holds {name} twice; refusing it.")
                files[name] = tar.extractfile(member).read()
    except tarfile.TarError as exc:
        raise BundleError(f"the download is not a bundle (not a tar file: {exc}); fetch it again.") from None
    return files


def verify_files(files: dict[str, bytes], fingerprint: str) -> dict:
    """Check ``files`` against the published ``fingerprint``; return the manifest.

    Every file must be listed with its exact SHA-256, and no file may be missing or extra."""
    fingerprint = normalise_fingerprint(fingerprint)
    if MANIFEST not in files:
        raise BundleError("the bundle has no manifest.json; it was not made by fedward's ship-plan.")
    got = sha256_bytes(files[MANIFEST])
    if got != fingerprint:
        raise BundleError(f"the bundle's manifest hashes to {got[:16]}..., not to the published fingerprint "
                          f"{fingerprint[:16]}...; the bundle was changed or is not the one published. "
                          "Do not use it: ask the federation to confirm the fingerprint and fetch again.")
    try:
        manifest = json.loads(files[MANIFEST])
        listed = manifest["files"]
    except (ValueError, KeyError, TypeError):
        raise BundleError("the bundle's manifest.json is not a fedward manifest.") from None
    if manifest.get("format") != FORMAT:
        raise BundleError(f"the bundle's format is {manifest.get('format')!r}; this sitekit reads {FORMAT}: update sitekit.")
    present = set(files) - {MANIFEST}
    for name in sorted(set(listed) - present):
        raise BundleError(f"bundle file {name} is listed in the manifest but missing; fetch the bundle again.")
    for name in sorted(present - set(listed)):
        raise BundleError(f"bundle file {name} is not in the manifest (something was added); do not use this bundle.")
    for name in sorted(listed):
        h = sha256_bytes(files[name])
        if h != listed[name]:
            raise BundleError(f"bundle file {name} has SHA-256 {h[:16]}... but the manifest says {listed[name][:16]}...: "
                              "it was changed after the federation made it. Do not use it; fetch the bundle again.")
        _check_no_private_key(name, files[name])
    if manifest.get("plan_sha256") != plan_sha256(files[PLAN]):
        raise BundleError("the manifest's plan_sha256 does not match plan/plan.yaml; do not use this bundle.")
    return manifest


def normalise_fingerprint(fp: str) -> str:
    fp = fp.strip().lower().replace(":", "")
    if fp.startswith("sha256:"):
        fp = fp[len("sha256:"):]
    if len(fp) != 64 or any(c not in "0123456789abcdef" for c in fp):
        raise BundleError(f"{fp!r} is not a SHA-256 fingerprint (64 hexadecimal digits, as the federation published it).")
    return fp


def read_folder(folder: Path) -> dict[str, bytes]:
    """Every regular file under ``folder`` (relative POSIX names -> bytes)."""
    files = {}
    for path in sorted(Path(folder).rglob("*")):
        if path.is_symlink():
            raise BundleError(f"{path} is a symbolic link; a bundle folder holds only regular files.")
        if path.is_file() and path.relative_to(folder).as_posix() != FINGERPRINT_FILE:
            files[path.relative_to(folder).as_posix()] = path.read_bytes()
    return files


def verify_folder(folder: Path, fingerprint: str) -> dict:
    """Re-check an unpacked bundle folder, byte for byte, against ``fingerprint``; return the manifest."""
    if not Path(folder).is_dir():
        raise BundleError(f"no bundle at {folder}; run 'sitekit fetch' first.")
    return verify_files(read_folder(Path(folder)), fingerprint)


def install(files: dict[str, bytes], fingerprint: str, dest: Path) -> dict:
    """Verify ``files`` and write them to ``dest`` atomically (a previous bundle is kept beside it)."""
    manifest = verify_files(files, fingerprint)
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    try:
        for name, data in files.items():
            out = tmp / name
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(data)
        (tmp / FINGERPRINT_FILE).write_text(normalise_fingerprint(fingerprint) + "\n")
        if dest.exists():  # the previous bundle is the federation's, but keep it for the record
            old_fp = (dest / "FINGERPRINT").read_text().strip()[:16] if (dest / "FINGERPRINT").exists() else "unknown"
            keep = dest.with_name(f"{dest.name}.previous-{old_fp}")
            if keep.exists():
                shutil.rmtree(keep)
            os.replace(dest, keep)
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def installed_fingerprint(dest: Path) -> str | None:
    f = Path(dest) / "FINGERPRINT"
    return f.read_text().strip() if f.exists() else None
