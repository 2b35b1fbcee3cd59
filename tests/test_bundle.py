"""Site bundles, approval and join's refusals, with the real PKI: a changed byte is refused, a plan changed
after approval is refused, and a private key never goes into a bundle."""
import json
import shutil
import tarfile
import io

import pytest

from sitekit import bundle as B
from sitekit import pki
from sitekit import sitehome as H
from sitekit.cli import main as sitekit_main
from sitekit.deploy import fetch
from sitekit.layout import participant_layout


def make_bundle(tmp_path, site="hospital-a", home=None):
    """A real bundle: a CA, a site key made in the site's own folder, its CSR signed by the CA."""
    ca = tmp_path / "ca"
    if not (ca / "ca.crt").exists():
        pki.create_ca(ca, "fed-test")
    home = home or tmp_path / site
    paths = participant_layout(home, "site", site)
    pki.make_key_and_request(paths["key"], paths["csr"], site)
    cert = pki.sign_request(ca, paths["csr"].read_bytes(), site, "site", tmp_path / f"{site}.crt")
    files = {
        B.PLAN: b"aggregator: {settings: {rounds_to_train: 2}}\n", B.COLS: b"collaborators: [hospital-a]\n",
        B.CA_CERT: (ca / "ca.crt").read_bytes(), B.site_cert_path(site): cert.read_bytes(),
        B.IMAGE: b'{"reference": "localhost/fedward/fed-test/collaborator:abc-hospital-a", "digest": "sha256:00"}\n',
        B.DATA_TEMPLATE: H.data_template(site).encode(), B.PREFLIGHT: b"aggregator: {host: localhost, port: 1}\n",
    }
    data, fp = B.pack("fed-test", site, files)
    return home, data, fp, files


def retar(data: bytes, change) -> bytes:
    files = B.read_tar(data)
    change(files)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, content in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    return buf.getvalue()


def test_fetch_installs_a_verified_bundle_and_the_sites_settings(tmp_path):
    home, data, fp, files = make_bundle(tmp_path)
    (tmp_path / "b.tar").write_bytes(data)
    manifest = fetch(home, fp, file=tmp_path / "b.tar")
    assert manifest["site"] == "hospital-a"
    assert manifest["plan_sha256"] == B.plan_sha256(files[B.PLAN])
    assert (home / "bundle" / B.PLAN).read_bytes() == files[B.PLAN]
    assert H.load_settings(home).site == "hospital-a"
    # the same inputs give the same bytes: the fingerprint is reproducible
    assert B.pack("fed-test", "hospital-a", files) == (data, fp)


@pytest.mark.parametrize("what", ["plan byte", "manifest", "extra file", "missing file"])
def test_a_changed_bundle_is_refused(tmp_path, what):
    home, data, fp, files = make_bundle(tmp_path)

    def change(f):
        if what == "plan byte":
            f[B.PLAN] = f[B.PLAN].replace(b"2", b"3")
        elif what == "manifest":
            m = json.loads(f[B.MANIFEST])
            m["files"][B.PLAN] = B.sha256_bytes(f[B.PLAN] + b"#")
            f[B.PLAN] += b"#"
            f[B.MANIFEST] = json.dumps(m).encode()
        elif what == "extra file":
            f["plan/extra.yaml"] = b"x: 1\n"
        else:
            del f[B.IMAGE]

    (tmp_path / "b.tar").write_bytes(retar(data, change))
    expected = {"plan byte": "bundle file plan/plan.yaml has SHA-256", "manifest": "not to the published fingerprint",
                "extra file": "plan/extra.yaml is not in the manifest", "missing file": "image.json is listed in the manifest but missing"}
    with pytest.raises(B.BundleError, match=expected[what]):
        fetch(home, fp, file=tmp_path / "b.tar")
    assert not (home / "bundle").exists()


def test_cli_refuses_a_wrong_fingerprint(tmp_path, capsys):
    home, data, fp, _ = make_bundle(tmp_path)
    (tmp_path / "b.tar").write_bytes(data)
    wrong = fp[:-1] + ("0" if fp[-1] != "0" else "1")
    assert sitekit_main(["fetch", "--home", str(home), "--file", str(tmp_path / "b.tar"), "--fingerprint", wrong]) == 2
    assert "not to the published fingerprint" in capsys.readouterr().err
    assert sitekit_main(["fetch", "--home", str(home), "--file", str(tmp_path / "b.tar"), "--fingerprint", fp]) == 0


def test_a_bundle_never_carries_a_private_key(tmp_path):
    home, data, fp, files = make_bundle(tmp_path)
    key = participant_layout(home, "site", "hospital-a")["key"].read_bytes()
    assert key not in data and b"PRIVATE KEY" not in data
    with pytest.raises(B.BundleError, match="holds a private key"):
        B.pack("fed-test", "hospital-a", {**files, B.site_cert_path("hospital-a"): files[B.site_cert_path("hospital-a")] + key})


def test_fetch_refuses_a_certificate_for_another_key(tmp_path):
    home, data, fp, _ = make_bundle(tmp_path)
    (tmp_path / "b.tar").write_bytes(data)
    paths = participant_layout(home, "site", "hospital-a")
    pki.make_key_and_request(paths["key"], paths["csr"], "hospital-a")  # keygen run again after the CSR was sent
    with pytest.raises(H.SiteError, match="not signed for this site's key"):
        fetch(home, fp, file=tmp_path / "b.tar")


def test_fetch_refuses_another_sites_bundle(tmp_path):
    home, data, fp, _ = make_bundle(tmp_path, "hospital-a")
    (tmp_path / "a.tar").write_bytes(data)
    fetch(home, fp, file=tmp_path / "a.tar")
    _, data_b, fp_b, _ = make_bundle(tmp_path, "hospital-b")
    (tmp_path / "b.tar").write_bytes(data_b)
    with pytest.raises(H.SiteError, match="this bundle is for site 'hospital-b'"):
        fetch(home, fp_b, file=tmp_path / "b.tar")


def test_approval_is_for_the_exact_plan(tmp_path, capsys):
    home, data, fp, files = make_bundle(tmp_path)
    (tmp_path / "b.tar").write_bytes(data)
    fetch(home, fp, file=tmp_path / "b.tar")
    with pytest.raises(H.ApprovalError, match="has not been approved"):
        H.check_approval(home)
    # a hash the administrator reviewed that is not the fetched plan's: nothing is approved
    assert sitekit_main(["approve", "--home", str(home), "--by", "A. Admin", "--plan-sha256", "0" * 64]) == 2
    assert not (home / H.APPROVAL).exists()
    assert sitekit_main(["approve", "--home", str(home), "--by", "A. Admin, radiology IT",
                         "--plan-sha256", B.plan_sha256(files[B.PLAN])]) == 0
    approval, manifest, _ = H.check_approval(home)
    assert approval["approved_by"] == "A. Admin, radiology IT"
    assert approval["plan_sha256"] == B.plan_sha256(files[B.PLAN]) and approval["bundle_fingerprint"] == fp
    assert approval["approved_at"].endswith("+00:00")
    assert len((home / H.APPROVALS_LOG).read_text().splitlines()) == 1

    # one byte of the plan changed on disk after approval: join refuses before anything starts
    plan = home / "bundle" / B.PLAN
    plan.write_bytes(plan.read_bytes().replace(b"2", b"5"))
    assert sitekit_main(["join", "--home", str(home)]) == 2
    err = capsys.readouterr().err
    assert "changed after it was approved by A. Admin, radiology IT" in err and "plan/plan.yaml" in err


def test_a_new_bundle_needs_a_new_approval(tmp_path, capsys):
    home, data, fp, files = make_bundle(tmp_path)
    (tmp_path / "b.tar").write_bytes(data)
    fetch(home, fp, file=tmp_path / "b.tar")
    H.approve(home, "A. Admin")
    files2 = {**files, B.PLAN: files[B.PLAN].replace(b"2", b"4")}
    data2, fp2 = B.pack("fed-test", "hospital-a", files2)
    (tmp_path / "b2.tar").write_bytes(data2)
    fetch(home, fp2, file=tmp_path / "b2.tar")  # verified, installed; the old one kept beside it
    assert (home / f"bundle.previous-{fp[:16]}" / B.PLAN).read_bytes() == files[B.PLAN]
    with pytest.raises(H.ApprovalError, match="after it was approved|was fetched after the approval"):
        H.check_approval(home)
    assert sitekit_main(["join", "--home", str(home)]) == 2
    H.approve(home, "A. Admin")
    assert H.check_approval(home)[1]["plan_sha256"] == B.plan_sha256(files2[B.PLAN])


def test_settings_errors_name_file_and_field(tmp_path):
    (tmp_path / "data.yaml").write_text("site: hospital-a\ndata: /x\nproxi: http://p:3128\n")
    with pytest.raises(H.SiteError, match=r"data.yaml: field 'proxi' is not a known field"):
        H.load_settings(tmp_path)
    (tmp_path / "data.yaml").write_text("site: hospital-a\n")
    with pytest.raises(H.SiteError, match=r"data.yaml: field 'data' is missing"):
        H.load_settings(tmp_path)


def test_layout_matches_the_engine():
    from pathlib import Path

    from sitekit.engine import openfl_adapter as engine

    assert engine.participant_layout(Path("x"), "site", "s")["cert"].as_posix() == "x/" + B.site_cert_path("s")
    assert engine.PLAN.as_posix() == B.PLAN and engine.COLS.as_posix() == B.COLS


def test_keygen_never_replaces_a_sites_key(tmp_path, capsys):
    # once: a second keygen silently replaced the key whose request the federation had already signed
    home = tmp_path / "hospital-a"
    assert sitekit_main(["keygen", "--workspace", str(home), "--role", "site", "--name", "hospital-a"]) == 0
    key = participant_layout(home, "site", "hospital-a")["key"]
    before = key.read_bytes()
    assert sitekit_main(["keygen", "--workspace", str(home), "--role", "site", "--name", "hospital-a"]) == 2
    err = capsys.readouterr().err
    assert "a private key already exists at" in err and str(key) in err and "never replaces" in err
    assert key.read_bytes() == before


@pytest.mark.parametrize("role, name, words", [
    ("site", "../../../../escaped", "is not a site name"),
    ("site", "Hospital A", "is not a site name"),
    ("aggregator", "bad host!", "is not a DNS name"),
])
def test_keygen_refuses_names_that_are_not_names(tmp_path, capsys, role, name, words):
    # once: '../../escaped' wrote escaped.key outside the site's folder
    home = tmp_path / "a" / "b" / "home"
    assert sitekit_main(["keygen", "--workspace", str(home), "--role", role, "--name", name]) == 2
    assert words in capsys.readouterr().err
    assert not any(p.suffix in (".key", ".csr") for p in tmp_path.rglob("*"))


def test_keygen_into_a_file_is_refused(tmp_path, capsys):
    f = tmp_path / "notes.txt"
    f.write_text("x")
    assert sitekit_main(["keygen", "--workspace", str(f), "--role", "site", "--name", "hospital-a"]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err and f.read_text() == "x"


def test_settings_of_the_wrong_type_and_mixed_unknown_keys(tmp_path):
    (tmp_path / "data.yaml").write_text("site: hospital-a\ndata: [1]\n")
    with pytest.raises(H.SiteError, match=r"data.yaml: field 'data' must be text \(a folder path\), got a list"):
        H.load_settings(tmp_path)
    # once: sorting the unknown keys 'foo' and 2 raised TypeError
    (tmp_path / "data.yaml").write_text("site: hospital-a\ndata: /x\nfoo: 1\n2: x\n")
    with pytest.raises(H.SiteError, match=r"data.yaml: field '(2|foo)' is not a known field"):
        H.load_settings(tmp_path)
    (tmp_path / "data.yaml").write_text("site: hospital-a\ndata: /x\ndata: /y\n")
    with pytest.raises(H.SiteError, match=r"data.yaml is not valid YAML at line 3 \(key 'data' is given twice"):
        H.load_settings(tmp_path)


def test_preflight_needs_an_existing_site_folder(tmp_path, capsys):
    # once: a mistyped --home was created and the report written there; a file gave a traceback
    missing = tmp_path / "hospitl-a"
    assert sitekit_main(["preflight", "--home", str(missing)]) == 2
    assert "does not exist" in capsys.readouterr().err and not missing.exists()
    f = tmp_path / "file"
    f.write_text("")
    assert sitekit_main(["preflight", "--home", str(f)]) == 2
    assert "is a file" in capsys.readouterr().err


def test_preflight_without_a_bundle_does_not_claim_an_allow_list_request(tmp_path, capsys):
    home = tmp_path / "hospital-a"
    home.mkdir()
    assert sitekit_main(["preflight", "--home", str(home)]) == 1
    out = capsys.readouterr().out
    assert "no allow-list request written this time" in out and not (home / "preflight" / "allow-list-request.txt").exists()


def test_check_data_with_an_empty_data_path_does_not_scan_the_current_folder(tmp_path, capsys, monkeypatch):
    # once: Path('') is '.', so the check read whatever folder it was started in
    monkeypatch.chdir(tmp_path)
    assert sitekit_main(["check-data", "--site", "hospital-a", "--data", ""]) == 3
    assert "site 'hospital-a': --data is empty" in capsys.readouterr().err
