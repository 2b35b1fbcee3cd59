"""The PKI: keys stay where they are made; the CA signs only what a participant claims to be."""
import stat

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from sitekit.pki import PKIError, create_ca, fingerprint, make_key_and_request, sign_request


def test_site_certificate_from_its_own_request(tmp_path):
    ca = create_ca(tmp_path / "ca", "fed")
    site = tmp_path / "site"
    csr = make_key_and_request(site / "k.key", site / "k.csr", "hospital-a")
    assert stat.S_IMODE((site / "k.key").stat().st_mode) == 0o600
    crt = sign_request(tmp_path / "ca", csr.read_bytes(), "hospital-a", "site", tmp_path / "out.crt")
    cert = x509.load_pem_x509_certificate(crt.read_bytes())
    ca_cert = x509.load_pem_x509_certificate(ca.read_bytes())
    cert.verify_directly_issued_by(ca_cert)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "hospital-a"
    assert ExtendedKeyUsageOID.CLIENT_AUTH in cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert len(fingerprint(crt.read_bytes()).split(":")) == 32


def test_aggregator_certificate_carries_dns_name(tmp_path):
    create_ca(tmp_path / "ca", "fed")
    csr = make_key_and_request(tmp_path / "a.key", tmp_path / "a.csr", "localhost", dns_name="localhost")
    crt = sign_request(tmp_path / "ca", csr.read_bytes(), "localhost", "aggregator", tmp_path / "a.crt")
    san = x509.load_pem_x509_certificate(crt.read_bytes()).extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.value.get_values_for_type(x509.DNSName) == ["localhost"]


def test_request_for_another_name_is_refused(tmp_path):
    create_ca(tmp_path / "ca", "fed")
    csr = make_key_and_request(tmp_path / "k.key", tmp_path / "k.csr", "hospital-a")
    with pytest.raises(PKIError, match="names 'hospital-a' but was submitted for 'hospital-b'"):
        sign_request(tmp_path / "ca", csr.read_bytes(), "hospital-b", "site", tmp_path / "x.crt")
    assert not (tmp_path / "x.crt").exists()


def test_garbage_request_is_refused(tmp_path):
    create_ca(tmp_path / "ca", "fed")
    with pytest.raises(PKIError, match="not a PEM CSR"):
        sign_request(tmp_path / "ca", b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
                     "hospital-a", "site", tmp_path / "x.crt")


def test_dotted_aggregator_host_keeps_its_whole_name(tmp_path):
    """Regression: Path.with_suffix cut 'aggregator.hospital.org' to 'aggregator.hospital'."""
    from sitekit.engine.openfl_adapter import participant_layout

    for host in ("aggregator.hospital.org", "127.0.0.1"):
        paths = participant_layout(tmp_path, "aggregator", host)
        assert paths["key"].name == f"agg_{host}.key"
        assert paths["cert"].name == f"agg_{host}.crt"
        assert paths["csr"].name == f"agg_{host}.csr"
