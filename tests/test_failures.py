"""Bad input and failing participants: a clear error naming the site and file, nothing half-written,
no process left behind, and a failed MLflow run marked FAILED."""
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from conftest import BIN, free_port, write_spec
from flows import federated_training as ft
from flows.federated_training import PortInUse, federated_training
from flows.supervisor import FederationFailed
from sitekit.data import DataError
from sitekit.spec import SpecError


def no_workspace_left(workdir: Path) -> bool:
    return not workdir.exists() or not any(workdir.iterdir())


def fedward_processes(marker: str) -> list[int]:
    """PIDs of live processes whose working directory lies under ``marker``."""
    pids = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            if str(p.joinpath("cwd").resolve()).startswith(marker):
                pids.append(int(p.name))
        except OSError:
            continue
    return pids


@pytest.fixture
def runner(prefect_server, mlflow_server, tmp_path):
    def run(spec_path):
        return federated_training(str(spec_path), workdir=str(tmp_path / "runs"))
    return run


def test_missing_nifti_is_reported_before_anything_starts(sites, tmp_path, runner):
    import shutil

    label = sorted((sites["hospital-b"] / "labelsTr").iterdir())[0]
    shutil.copyfile(label, sites["hospital-b"] / "labelsTr" / "extra.nii.gz")
    (sites["hospital-b"] / "imagesTr" / "extra.nii.gz").write_bytes(b"")  # a transfer that never arrived
    spec = write_spec(tmp_path / "fed.yaml", sites, free_port())
    with pytest.raises(DataError) as err:
        runner(spec)
    assert "site 'hospital-b'" in str(err.value) and "extra.nii.gz" in str(err.value)
    assert no_workspace_left(tmp_path / "runs")


def test_two_sites_on_one_folder(sites, tmp_path, runner):
    spec = write_spec(tmp_path / "fed.yaml", {"hospital-a": sites["hospital-a"], "hospital-b": sites["hospital-a"]}, free_port())
    with pytest.raises(SpecError, match=r"field 'sites\[1\].data' of site 'hospital-b' .* overlaps the data folder of site 'hospital-a'"):
        runner(spec)
    assert no_workspace_left(tmp_path / "runs")


def test_yaml_typo(sites, tmp_path, runner):
    spec = write_spec(tmp_path / "fed.yaml", sites, free_port(), local_epoch=1)
    with pytest.raises(SpecError, match=r"fed.yaml: field 'local_epoch' is not a known field \(did you mean 'local_epochs'\?\)"):
        runner(spec)
    assert no_workspace_left(tmp_path / "runs")


def test_port_in_use(sites, tmp_path, runner):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        spec = write_spec(tmp_path / "fed.yaml", sites, port)
        with pytest.raises(PortInUse, match=rf"field 'aggregator.port' is {port}, which is already in use"):
            runner(spec)
    assert no_workspace_left(tmp_path / "runs")


def test_workspace_is_all_or_nothing(sites, tmp_path, monkeypatch):
    """A failure while building the workspace (fault injected into the model initialisation) leaves no folder."""
    from sitekit.spec import load_spec

    spec = load_spec(write_spec(tmp_path / "fed.yaml", sites, free_port()))

    def boom(*a, **k):
        raise OSError("disk full (injected)")

    monkeypatch.setattr(ft.engine, "initialize_model", boom)
    with pytest.raises(OSError, match="injected"):
        ft.build_workspace.fn(spec, tmp_path / "runs")
    assert no_workspace_left(tmp_path / "runs")


def _wait_for_event(workdir: Path, predicate, timeout: float) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for events in workdir.glob("*/aggregator/events.jsonl"):
            import json

            for line in events.read_text().splitlines():
                if line.strip() and predicate(json.loads(line)):
                    return events.parents[1]
        time.sleep(0.2)
    raise AssertionError(f"event not seen within {timeout} s")


def _collaborator_pid(workspace: Path, site: str) -> int:
    for pid in fedward_processes(str(workspace / "sites" / site)):
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        if b"collaborator" in cmd:
            return pid
    raise AssertionError(f"no collaborator process for {site}")


def _start_cli(spec: Path, workdir: Path) -> subprocess.Popen:
    return subprocess.Popen([str(BIN / "fedward"), "run", str(spec), "--workdir", str(workdir)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ.copy())


@pytest.mark.parametrize("how", ["dies", "hangs"])
def test_participant_failing_mid_round(how, ixi_pool, tmp_path, prefect_server, mlflow_server):
    """A site killed (SIGKILL) or frozen (SIGSTOP) in round 2: the flow names it, stops everything,
    and the MLflow run is FAILED."""
    spec = write_spec(tmp_path / "fed.yaml", ixi_pool, free_port(), rounds=3, local_epochs=3,
                      timeouts={"startup_seconds": 120, "round_seconds": 15})
    workdir = tmp_path / "runs"
    proc = _start_cli(spec, workdir)
    try:
        ws = _wait_for_event(workdir, lambda e: e["event"] == "assigned" and e["round"] == 1 and e["site"] == "hospital-b", 240)
        os.kill(_collaborator_pid(ws, "hospital-b"), signal.SIGKILL if how == "dies" else signal.SIGSTOP)
        out, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 2, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("fedward: site 'hospital-b'"), last
    if how == "dies":
        assert "failed in round 2" in last and "killed by signal 9" in err
    else:
        assert "sent no update for round 2 within 15 s" in last
    assert fedward_processes(str(ws)) == []  # every participant was stopped
    client = MlflowClient()
    exp = client.get_experiment_by_name("fedward/ixi-test")
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`fedward.workspace` = '{ws}'")
    assert len(runs) == 1 and runs[0].info.status == "FAILED"
    assert not (ws / "models" / "global.pt").exists()


def test_prefect_logs_a_user_error_without_its_traceback_and_keeps_a_bugs():
    # once: a site's bad data printed two full Prefect tracebacks (64 lines) before fedward's one sentence
    import logging
    import sys as _sys

    import flows.federated_training  # noqa: F401  (installs the filter)
    from sitekit.data import DataError

    def record(exc: BaseException) -> logging.LogRecord:
        try:
            raise exc
        except BaseException:
            info = _sys.exc_info()
        return logging.LogRecord("prefect.task_runs", logging.ERROR, __file__, 1, "Task run failed with exception: %r",
                                 (exc,), info)

    for name in ("prefect.task_runs", "prefect.flow_runs"):
        user = record(DataError("site 'hospital-a': data folder /x does not exist; fix the site's 'data' path."))
        assert logging.getLogger(name).filter(user) and user.exc_info is None
        assert "data folder /x does not exist" in user.getMessage()
        bug = record(KeyError("a bug"))
        assert logging.getLogger(name).filter(bug) and bug.exc_info is not None and bug.exc_info[0] is KeyError
