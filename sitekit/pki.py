"""The federation's PKI: a federation CA, and keys that never leave the participant that made them.

The flow of a certificate, as in FeTS:

1. A participant (a hospital, or the aggregator) runs :func:`make_key_and_request` in its own
   folder. The private key is written there (mode 0600) and stays there.
2. Only the certificate request (CSR) goes to the federation operator, who checks that it
   names the participant it claims to be and signs it with :func:`sign_request`.
3. The signed certificate and the CA certificate go back to the participant.

Identities: a site's certificate has CN = the site name (OpenFL checks CN == collaborator name);
the aggregator's has CN and DNS SAN = the host name collaborators dial.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALID_DAYS = 365


class PKIError(ValueError):
    """A certificate request or certificate is not what it claims to be."""


def _write(path: Path, data: bytes, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn), x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedward federation")])


def fingerprint(cert_pem: bytes) -> str:
    """SHA-256 fingerprint of a PEM certificate, as hospital IT compares it (AA:BB:...)."""
    der = x509.load_pem_x509_certificate(cert_pem).public_bytes(serialization.Encoding.DER)
    h = hashlib.sha256(der).hexdigest().upper()
    return ":".join(h[i : i + 2] for i in range(0, len(h), 2))


def create_ca(ca_dir: Path, federation: str) -> Path:
    """Create the federation CA in ``ca_dir`` (ca.key stays there); return the CA certificate path."""
    key = ec.generate_private_key(ec.SECP384R1())
    now = dt.datetime.now(dt.timezone.utc)
    name = _name(f"{federation} federation CA")
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .sign(key, hashes.SHA384())
    )
    _write(ca_dir / "ca.key", key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()), 0o600)
    _write(ca_dir / "ca.crt", cert.public_bytes(serialization.Encoding.PEM))
    return ca_dir / "ca.crt"


def make_key_and_request(key_path: Path, csr_path: Path, common_name: str, dns_name: str | None = None) -> Path:
    """Generate a private key at ``key_path`` (mode 0600) and a CSR for ``common_name``.

    Run this inside the participant's own folder: only the CSR is meant to leave it.
    """
    key = ec.generate_private_key(ec.SECP384R1())
    builder = x509.CertificateSigningRequestBuilder().subject_name(_name(common_name))
    if dns_name:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(dns_name)]), critical=False)
    csr = builder.sign(key, hashes.SHA384())
    _write(key_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()), 0o600)
    _write(csr_path, csr.public_bytes(serialization.Encoding.PEM))
    return csr_path


def sign_request(ca_dir: Path, csr_pem: bytes, expected_name: str, role: str, cert_path: Path) -> Path:
    """Sign a participant's CSR with the federation CA after checking who it claims to be.

    ``role`` is "site" (client certificate, CN must equal the site name) or "aggregator"
    (server certificate, CN and DNS SAN must equal the host collaborators dial).
    """
    if role not in ("site", "aggregator"):
        raise ValueError(role)
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except ValueError as exc:
        raise PKIError(f"certificate request for '{expected_name}' is not a PEM CSR ({exc}).") from None
    if not csr.is_signature_valid:
        raise PKIError(f"certificate request for '{expected_name}' has an invalid signature; ask the participant to generate it again.")
    cns = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    cn = cns[0].value if cns else None
    if cn != expected_name:
        raise PKIError(f"certificate request names '{cn}' but was submitted for '{expected_name}'; refusing to sign.")
    ca_key = serialization.load_pem_private_key((ca_dir / "ca.key").read_bytes(), password=None)
    ca_cert = x509.load_pem_x509_certificate((ca_dir / "ca.crt").read_bytes())
    now = dt.datetime.now(dt.timezone.utc)
    usage = ExtendedKeyUsageOID.CLIENT_AUTH if role == "site" else ExtendedKeyUsageOID.SERVER_AUTH
    builder = (
        x509.CertificateBuilder()
        .subject_name(csr.subject)
        .issuer_name(ca_cert.subject)
        .public_key(csr.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    )
    if role == "aggregator":
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(expected_name)]), critical=False)
    cert = builder.sign(ca_key, hashes.SHA384())
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    return cert_path
