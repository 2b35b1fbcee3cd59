"""Shipping a federation to hospitals, end to end on real components: images built through podman's
Docker-compatible API (the `docker` SDK), bundles on a real S3 server (rclone) behind per-site presigned
links, MLflow and Prefect servers, and sitekit run inside the built image on real IXI data.

The images here use the slim ``core`` profile (sitekit without torch/OpenFL, see images/README.md):
enough for `sitekit --version`, fetch, approve and preflight, and quick to build in CI."""
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from conftest import free_port, write_spec
from sitekit import bundle as B
from sitekit import pki
from sitekit import sitehome as H
from sitekit.cli import main as sitekit_main
from sitekit.layout import participant_layout

SITES = ("hospital-a", "hospital-b")
UID = 10001  # the images' unprivileged user


@pytest.fixture(scope="module")
def shipped(tmp_path_factory, ixi_pool, podman_api, s3_server, mlflow_server, prefect_server):
    """keygen at each site -> build-site-images -> ship-plan; the sites' folders hold only their own keys."""
    from flows.ship_plan import ship_plan
    from flows.site_images import build_site_images

    root = tmp_path_factory.mktemp("deploy")
    spec = write_spec(root / "fed.yaml", ixi_pool, free_port(), name="ixi-ship")
    homes = {s: root / "sites" / s for s in SITES}
    for site, home in homes.items():  # each hospital makes its key; only the CSR is sent
        assert sitekit_main(["keygen", "--workspace", str(home), "--role", "site", "--name", site]) == 0
    csrs = {s: str(participant_layout(h, "site", s)["csr"]) for s, h in homes.items()}
    images = build_site_images(str(spec), profile="core", docker_host=podman_api["url"], workdir=str(root / "image-contexts"))
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    os.environ.update({"AWS_ACCESS_KEY_ID": s3_server["key"], "AWS_SECRET_ACCESS_KEY": s3_server["secret"]})
    try:
        result = ship_plan(str(spec), csrs, images, bucket="fedward-bundles", s3_endpoint=s3_server["endpoint"],
                           workdir=str(root / "federation"))
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    import docker

    return {"root": root, "spec": spec, "homes": homes, "images": images, "shipped": result,
            "client": docker.DockerClient(base_url=podman_api["url"], timeout=600), "federation": root / "federation"}


def test_one_image_per_site_tagged_and_recorded_in_mlflow(shipped):
    import mlflow

    images, client = shipped["images"], shipped["client"]
    plan = (shipped["federation"] / "aggregator" / "plan" / "plan.yaml").read_bytes()
    plan_sha = B.plan_sha256(plan)
    assert images["plan_sha256"] == plan_sha == shipped["shipped"]["plan_sha256"]
    ids = set()
    for site in SITES:
        img = images["sites"][site]
        assert img["reference"] == f"localhost/fedward/ixi-ship/collaborator:{plan_sha[:12]}-{site}"
        live = client.images.get(img["reference"])
        assert live.id == img["id"]
        assert live.labels["org.fedward.site"] == site and live.labels["org.fedward.plan-sha256"] == plan_sha
        assert img["digest"] == live.attrs["RepoDigests"][0].split("@")[1]
        ids.add(live.id)
    assert len(ids) == 2  # per-site images really differ (their plan identity layer)
    assert client.images.get(images["aggregator"]["reference"]).labels["org.fedward.role"] == "aggregator"
    run = mlflow.search_runs(experiment_names=["fedward/ixi-ship"], filter_string="tags.`fedward.step` = 'build-site-images'",
                             output_format="list")[0]
    assert run.data.params["plan_sha256"] == plan_sha
    for site in SITES:
        assert run.data.tags[f"image.{site}"] == f"{images['sites'][site]['reference']}@{images['sites'][site]['digest']}"


def test_each_site_can_read_only_its_own_bundle(shipped, tmp_path, capsys):
    sites = shipped["shipped"]["sites"]
    url_a, url_b = sites["hospital-a"]["url"], sites["hospital-b"]["url"]
    with urllib.request.urlopen(url_a, timeout=10) as r:
        manifest = B.verify_files(B.read_tar(r.read()), sites["hospital-a"]["fingerprint"])
    assert manifest["site"] == "hospital-a"
    # site A edits its own link to point at site B's bundle: the signature no longer matches
    tampered = url_a.replace(sites["hospital-a"]["key"], sites["hospital-b"]["key"])
    assert tampered != url_a
    unsigned = url_b.split("?", 1)[0]
    longer = url_a.replace("X-Amz-Expires=604800", "X-Amz-Expires=999999")  # stretching its own link's lifetime
    assert longer != url_a
    for url, code in ((tampered, 403), (longer, 403), (unsigned, (400, 403))):  # unsigned: rclone says 400
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(url, timeout=10)
        assert err.value.code in (code if isinstance(code, tuple) else (code,))
        assert b"<Error>" in err.value.read()
    home = tmp_path / "a"
    shutil.copytree(shipped["homes"]["hospital-a"], home)
    assert sitekit_main(["fetch", "--home", str(home), "--url", tampered, "--fingerprint", sites["hospital-b"]["fingerprint"]]) == 2
    assert "refused (403" in capsys.readouterr().err
    # B's genuine link and fingerprint, used at site A: refused, it is another site's bundle
    assert sitekit_main(["fetch", "--home", str(home), "--url", url_b, "--fingerprint", sites["hospital-b"]["fingerprint"]]) == 2
    assert "this bundle is for site 'hospital-b'" in capsys.readouterr().err


def test_fingerprints_are_published_and_no_site_key_left_its_site(shipped, s3_server, mlflow_server):
    import mlflow

    sites = shipped["shipped"]["sites"]
    run = mlflow.search_runs(experiment_names=["fedward/ixi-ship"], filter_string="tags.`fedward.step` = 'ship-plan'",
                             output_format="list")[0]
    published = (shipped["federation"] / "fingerprints.txt").read_text().split()
    for site in SITES:
        assert run.data.tags[f"bundle.{site}"] == sites[site]["fingerprint"]
        assert published[published.index(site) + 1] == sites[site]["fingerprint"]
        obj = s3_server["data"] / "fedward-bundles" / sites[site]["key"]
        files = B.read_tar(obj.read_bytes())
        assert B.sha256_bytes(files[B.MANIFEST]) == sites[site]["fingerprint"]
        image = json.loads(files[B.IMAGE])
        assert image["reference"] == shipped["images"]["sites"][site]["reference"]
        assert image["digest"] == shipped["images"]["sites"][site]["digest"]
    # links are capabilities: they go to each site privately, never into MLflow
    logged = json.dumps([run.data.tags, run.data.params])
    assert "X-Amz-Signature" not in logged and "X-Amz-Signature" in sites["hospital-a"]["url"]
    # The private keys exist only in the sites' own folders: nowhere in S3, MLflow or the federation's folder.
    keys = [participant_layout(h, "site", s)["key"].read_bytes() for s, h in shipped["homes"].items()]
    assert all(b"PRIVATE KEY" in k for k in keys)
    roots = [s3_server["data"], shipped["federation"]]
    for root in roots:
        for path in Path(root).rglob("*"):
            if path.is_file():
                data = path.read_bytes()
                assert not any(k in data for k in keys), path
                if b"PRIVATE KEY" in data:  # only the federation's own keys (its CA and its aggregator)
                    assert path.relative_to(shipped["federation"]).parts[0] in ("ca", "aggregator"), path


def _site_home_for_container(shipped, site: str, tmp_path: Path, data_in_container: str = "/data") -> Path:
    """A copy of the site's folder, with its bundle fetched (on the host, through its link) and data.yaml filled in."""
    home = tmp_path / site
    shutil.copytree(shipped["homes"][site], home)
    s = shipped["shipped"]["sites"][site]
    assert sitekit_main(["fetch", "--home", str(home), "--url", s["url"], "--fingerprint", s["fingerprint"]]) == 0
    (home / "data.yaml").write_text(f"site: {site}\ndata: {data_in_container}\n")
    subprocess.run(["chown", "-R", f"{UID}:{UID}", str(home)], check=True)
    return home


def _run(client, image: str, args: list[str], volumes: dict, timeout: float = 120) -> tuple[int, str]:
    c = client.containers.run(image, args, volumes=volumes, network_mode="none", detach=True, user=str(UID))
    try:
        code = c.wait(timeout=timeout)["StatusCode"]
        return code, c.logs().decode()
    finally:
        c.remove(force=True)


def test_sitekit_version_and_preflight_inside_the_image(shipped, ixi_pool, tmp_path):
    client, site = shipped["client"], "hospital-a"
    ref = shipped["images"]["sites"][site]["reference"]
    out = client.containers.run(ref, ["--version"], remove=True, network_mode="none")
    assert out.decode().strip() == "sitekit 0.1.0"
    home = _site_home_for_container(shipped, site, tmp_path)
    vols = {str(home): {"bind": "/site", "mode": "rw"}, str(ixi_pool[site]): {"bind": "/data", "mode": "ro"}}
    code, logs = _run(client, ref, ["preflight", "--home", "/site"], vols)
    report = (home / "preflight" / "report.txt").read_text()
    assert code == 1, logs  # not ready: the container has no network at all
    assert report in logs
    assert "[PASS] identity" in report and "[PASS] privacy" in report and "[WARN] bundle" in report
    assert "[PASS] data" in report and "6 training and 2 held-out test cases" in report
    assert "[FAIL] network" in report and "no HTTPS proxy is configured" in report and "-> ask IT to:" in report
    assert "RESULT: NOT READY (network failed)" in report
    data = json.loads((home / "preflight" / "report.json").read_text())
    assert {c["name"]: c["figures"] for c in data["checks"]}["data"]["train_cases"] == 6
    # the allow-list request names the aggregator, its port, outbound only, and the real fingerprints
    allow = (home / "preflight" / "allow-list-request.txt").read_text()
    port = json.loads(json.dumps(__import__("yaml").safe_load((home / "bundle" / B.PREFLIGHT).read_text())))["aggregator"]["port"]
    agg_cert = next((shipped["federation"] / "aggregator" / "cert" / "server").glob("agg_*.crt")).read_bytes()
    assert "Destination (FQDN)     : localhost" in allow and f"Port                   : {port}/TCP" in allow
    assert "OUTBOUND ONLY" in allow
    assert pki.fingerprint(agg_cert) in allow
    assert pki.fingerprint((home / "bundle" / B.site_cert_path(site)).read_bytes()) in allow
    assert "PRIVATE KEY" not in allow and "PRIVATE KEY" not in report


def test_join_inside_the_image_refuses_fast_without_a_route_and_refuses_another_plan(shipped, ixi_pool, tmp_path):
    client = shipped["client"]
    ref_a = shipped["images"]["sites"]["hospital-a"]["reference"]
    home = _site_home_for_container(shipped, "hospital-a", tmp_path)
    vols = {str(home): {"bind": "/site", "mode": "rw"}, str(ixi_pool["hospital-a"]): {"bind": "/data", "mode": "ro"}}
    code, logs = _run(client, ref_a, ["join", "--home", "/site"], vols)
    assert code == 2 and "has not been approved" in logs, logs
    H.approve(home, "A. Admin")
    subprocess.run(["chown", "-R", f"{UID}:{UID}", str(home)], check=True)
    t0 = time.monotonic()
    code, logs = _run(client, ref_a, ["join", "--home", "/site", "--network-timeout", "3"], vols)
    assert code == 5, logs
    assert "Ask your IT team to" in logs and "no HTTPS proxy is configured" in logs
    assert time.monotonic() - t0 < 60  # bounded: no endless retry
    # hospital-b's folder run in hospital-a's image: the image was built for another site
    home_b = _site_home_for_container(shipped, "hospital-b", tmp_path)
    H.approve(home_b, "B. Admin")
    subprocess.run(["chown", "-R", f"{UID}:{UID}", str(home_b)], check=True)
    code, logs = _run(client, ref_a, ["join", "--home", "/site"], {str(home_b): {"bind": "/site", "mode": "rw"}})
    assert code == 2 and "this image was built for site 'hospital-a'" in logs, logs
