"""Shared fixtures: real IXI cases in site folders, and real Prefect and MLflow servers on loopback."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("FEDWARD_DATA", REPO.parent / "shared" / "data")).resolve()
IXI = DATA / "ixi-hh"
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ixi_case_ids() -> list[str]:
    return sorted(p.name[: -len("_T1.nii.gz")] for p in (IXI / "T1").glob("*_T1.nii.gz"))


def make_site(folder: Path, case_ids: list[str], n_train: int) -> Path:
    """A site folder holding real IXI cases (image + DLMUSE label), laid out as fedward expects."""
    for i, cid in enumerate(case_ids):
        split = ("imagesTr", "labelsTr") if i < n_train else ("imagesTs", "labelsTs")
        for d in split:
            (folder / d).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(IXI / "T1" / f"{cid}_T1.nii.gz", folder / split[0] / f"{cid}.nii.gz")
        shutil.copyfile(IXI / "DLMUSE" / f"{cid}_T1_DLMUSE.nii.gz", folder / split[1] / f"{cid}.nii.gz")
    return folder


@pytest.fixture(scope="session")
def ixi_pool(tmp_path_factory) -> dict[str, Path]:
    """Two small real-IXI sites (6 training + 2 test cases each), built once per session, read-only by convention."""
    if not IXI.is_dir():
        pytest.fail(f"IXI data not found at {IXI}; set FEDWARD_DATA to the shared data folder")
    ids = ixi_case_ids()
    root = tmp_path_factory.mktemp("ixi-sites")
    return {
        "hospital-a": make_site(root / "hospital-a", ids[0:8], 6),
        "hospital-b": make_site(root / "hospital-b", ids[8:16], 6),
    }


@pytest.fixture(scope="session")
def pneumonia_pool(tmp_path_factory) -> dict[str, Path]:
    """Three small real PneumoniaMNIST sites (the benchmark's seeded 45/33/22 % split of the first
    900 training and 300 test images: 405/297/198 training, 135/99/66 test), read-only by convention."""
    from flows.pneumonia_data import prepare_pneumonia_sites

    source = DATA / "medmnist" / "pneumoniamnist.npz"
    if not source.exists():
        pytest.fail(f"PneumoniaMNIST not found at {source}; set FEDWARD_DATA to the shared data folder")
    return prepare_pneumonia_sites(source, tmp_path_factory.mktemp("pneumonia-sites"), max_train=900, max_test=300)


@pytest.fixture
def sites(ixi_pool, tmp_path) -> dict[str, Path]:
    """A private copy of the pool for tests that break files."""
    out = {}
    for name, folder in ixi_pool.items():
        out[name] = Path(shutil.copytree(folder, tmp_path / "data" / name))
    return out


def site_governance(site: str) -> dict:
    """A complete, in-force governance record for a test site (test data, no real agreement)."""
    return {"controller": f"Test controller of {site}", "role": "joint_controller",
            "lawful_basis": {"art6": "e", "art9": "j"},
            "dpa": {"reference": f"TEST-DPA-{site}", "date": "2026-01-15", "valid_until": "2099-12-31"},
            "dpia": {"reference": f"TEST-DPIA-{site}", "date": "2026-01-08"},
            "data_use": "fedward tests: train and evaluate a model; no other use."}


def write_spec(path: Path, sites: dict[str, Path], port: int, **overrides) -> Path:
    import yaml

    spec = {
        "name": "ixi-test",
        "task": {"model": {"name": "unet3d", "channels": [8, 16, 32, 64], "strides": [2, 2, 2], "res_units": 1},
                 "loss": "dice_ce", "metric": "dice", "input_size": [64, 64, 64]},
        "sites": [{"name": n, "data": str(f), "governance": site_governance(n)} for n, f in sites.items()],
        "rounds": 2, "local_epochs": 1, "batch_size": 2, "learning_rate": 0.005,
        "algorithm": "fedavg", "aggregator": {"host": "localhost", "port": port}, "tls": True,
        "timeouts": {"startup_seconds": 120, "round_seconds": 180},
    }
    for k, v in overrides.items():
        spec[k] = v
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def _wait_http(url: str, proc: subprocess.Popen, what: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{what} did not answer {url} within {timeout} s")


def _stop(proc: subprocess.Popen) -> None:
    import signal

    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=15)


@pytest.fixture(scope="session", autouse=True)
def isolated_home(tmp_path_factory):
    """Keep tests out of the repo's .fedward (the demo's MLflow store and workspaces)."""
    home = tmp_path_factory.mktemp("fedward-home")
    os.environ["FEDWARD_HOME"] = str(home)
    yield home


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """A real Prefect server on loopback shared by every flow test (one cold start, ~15 s)."""
    home = tmp_path_factory.mktemp("prefect")
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(home), "DO_NOT_TRACK": "1",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT": "false",
           "PREFECT_UI_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    log = open(home / "server.log", "wb")
    proc = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}/api"
    try:
        _wait_http(f"{url}/health", proc, "prefect server")
        os.environ["PREFECT_API_URL"] = url  # for subprocesses (fedward run)
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings(updates={PREFECT_API_URL: url}):  # for flows run in this process
            yield url
    finally:
        os.environ.pop("PREFECT_API_URL", None)
        _stop(proc)
        log.close()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real MLflow tracking server (sqlite backend, artifacts served by the server) on loopback."""
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
    log = open(root / "server.log", "wb")
    proc = subprocess.Popen([str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                             "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
                             "--artifacts-destination", str(root / "artifacts"), "--serve-artifacts"],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_http(f"{url}/health", proc, "mlflow server")
        os.environ["MLFLOW_TRACKING_URI"] = url
        yield url
    finally:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
        _stop(proc)
        log.close()


RCLONE = REPO / ".tools" / "bin" / "rclone"


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3 server (``rclone serve s3``) on loopback; yields endpoint, key and secret.

    Buckets are folders under its data directory. rclone comes from ``make setup``
    (infra/get-rclone.sh)."""
    if not RCLONE.exists():
        pytest.fail(f"{RCLONE} is missing; run 'make setup' (it fetches rclone with infra/get-rclone.sh)")
    root = tmp_path_factory.mktemp("s3")
    (root / "data").mkdir()
    port = free_port()
    key, secret = "fedward-test-key", "fedward-test-secret-0123456789"
    log = open(root / "server.log", "wb")
    proc = subprocess.Popen([str(RCLONE), "serve", "s3", "--addr", f"127.0.0.1:{port}", "--auth-key", f"{key},{secret}",
                             "--cache-dir", str(root / "cache"), str(root / "data")],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"rclone serve s3 exited with {proc.returncode}; see {root / 'server.log'}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"rclone serve s3 did not listen on {url} within 30 s")
                time.sleep(0.2)
        yield {"endpoint": url, "key": key, "secret": secret, "data": root / "data"}
    finally:
        _stop(proc)
        log.close()


@pytest.fixture(scope="session")
def podman_api(tmp_path_factory):
    """podman's Docker-compatible API on a Unix socket, with its own image store (fresh each session).

    runc and low ulimits as ENVIRONMENT.md says (crun fails here). Yields {"url", "env", "podman"}:
    ``podman`` is the command prefix for the same store (for clean-up and inspection)."""
    import shutil as _shutil

    for tool in ("podman", "runc"):
        if not _shutil.which(tool):
            pytest.fail(f"{tool} is missing; apt-get install podman buildah runc debootstrap (see .ci/run)")
    root = tmp_path_factory.mktemp("podman")
    conf = root / "containers.conf"
    conf.write_text('[engine]\nruntime = "runc"\ncgroup_manager = "cgroupfs"\nevents_logger = "file"\n'
                    '[containers]\ndefault_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]\n')
    env = {**os.environ, "CONTAINERS_CONF": str(conf)}
    podman = ["podman", "--root", str(root / "storage"), "--runroot", str(root / "run"), "--tmpdir", str(root / "tmp")]
    sock = root / "podman.sock"
    log = open(root / "service.log", "wb")
    proc = subprocess.Popen([*podman, "system", "service", "--time=0", f"unix://{sock}"], env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    url = f"unix://{sock}"
    try:
        import docker

        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"podman system service exited with {proc.returncode}; see {root / 'service.log'}")
            try:
                if sock.exists() and docker.DockerClient(base_url=url, timeout=5).ping():
                    break
            except Exception:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"podman's API did not answer on {sock} within 30 s")
            time.sleep(0.2)
        yield {"url": url, "env": env, "podman": podman}
    finally:
        _stop(proc)
        log.close()
        for args in (["rm", "--all", "--force"], ["rmi", "--all", "--force"]):
            subprocess.run([*podman, *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120)
        subprocess.run(["umount", "-R", str(root / "storage" / "overlay")], stderr=subprocess.DEVNULL)
        _shutil.rmtree(root / "storage", ignore_errors=True)
