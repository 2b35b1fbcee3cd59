"""Operations against the real stack that ``make stack`` starts (Prefect server + process worker, MLflow
server whose artifacts live on a real S3 server, all on 127.0.0.1):

1. a deployment from flows/deployments.py on an interval schedule fires through the Prefect server,
   the stack's worker runs the federation (two real heart-disease hospitals, OpenFL over mTLS), and the
   new model replaces a (weak) ``@champion`` because it scores better at every site's test cases;
2. a retraining that is worse stays ``@challenger`` and says why, the champion does not move;
3. the model card and version tags are complete and agree with the run; the audit log and the DPIA
   annex are MLflow artifacts stored on S3, and the audit log verifies against the head tag;
4. ``make stack`` is idempotent and loopback-only, ``make stack-down`` stops every process.
"""
from __future__ import annotations

import datetime as dt
import json
import os
import re
import subprocess
import time
from pathlib import Path

import mlflow
import pytest
import yaml
from mlflow import MlflowClient

from conftest import DATA, REPO, RCLONE, free_port, site_governance
from flows import dpia
from sitekit.audit import verify
from sitekit.spec import load_spec

HEART = DATA / "heart-disease"
NAME = "ops-heart"
SITES = {"cleveland": HEART / "processed.cleveland.data", "hungary": HEART / "processed.hungarian.data"}


def write_spec(path: Path, **overrides) -> Path:
    # The configuration of tests/test_gate_federation.py that the gate accepts (weighted_mean).
    spec = {
        "name": NAME,
        "task": {"kind": "tabular", "dataset": "heart-disease", "model": {"name": "logreg"}, "standardise": "federated"},
        "sites": [{"name": n, "data": str(f), "governance": site_governance(n)} for n, f in SITES.items()],
        "rounds": 5, "local_steps": 50, "batch_size": 4, "learning_rate": 0.01, "gate": "weighted_mean",
        "aggregator": {"host": "localhost", "port": free_port()},
        "timeouts": {"startup_seconds": 180, "round_seconds": 180},
        **overrides,
    }
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def weighted(scores: dict, model: str) -> float:
    n = {s: v["test_cases"] for s, v in scores["_cases"].items()}
    return sum(scores[s][model] * n[s] for s in n) / sum(n.values())


def make(target: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "--no-print-directory", target], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)


def listening(port: int) -> set[str]:
    """Local addresses with a LISTEN socket on ``port`` (from /proc/net/tcp and tcp6)."""
    out = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            f = line.split()
            addr, hexport = f[1].rsplit(":", 1)
            if int(hexport, 16) == port and f[3] == "0A":
                out.add(addr)
    return out


# --------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    root = tmp_path_factory.mktemp("stack")
    ports = {"PREFECT": free_port(), "MLFLOW": free_port(), "S3": free_port()}
    env = {**os.environ, "FEDWARD_STACK_DIR": str(root), **{f"FEDWARD_STACK_{k}_PORT": str(v) for k, v in ports.items()}}
    for k in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI"):  # the stack's own, not a session fixture's
        env.pop(k, None)
    up = make("stack", env)
    saved = {k: os.environ.get(k) for k in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI")}
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        urls = {"prefect": f"http://127.0.0.1:{ports['PREFECT']}/api", "mlflow": f"http://127.0.0.1:{ports['MLFLOW']}",
                "s3": f"http://127.0.0.1:{ports['S3']}"}
        os.environ["PREFECT_API_URL"], os.environ["MLFLOW_TRACKING_URI"] = urls["prefect"], urls["mlflow"]
        mlflow.set_tracking_uri(urls["mlflow"])
        from prefect.settings import PREFECT_API_URL, temporary_settings

        pids = {s: int((root / "pids" / f"{s}.pid").read_text()) for s in ("s3", "mlflow", "prefect", "worker")}
        with temporary_settings(updates={PREFECT_API_URL: urls["prefect"]}):
            yield {"root": root, "env": env, "ports": ports, "urls": urls, "up": up.stdout, "pids": pids}
    finally:
        make("stack-down", env)  # idempotent; the last test checks it properly
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if saved["MLFLOW_TRACKING_URI"]:
            mlflow.set_tracking_uri(saved["MLFLOW_TRACKING_URI"])


@pytest.fixture(scope="module")
def seeded_champion(stack):
    """A weak model already in production: the untrained logistic regression, as version 1 @champion."""
    import torch

    from sitekit.tabular import N_FEATURES
    from sitekit.tasks import get_task

    spec = load_spec(write_spec(stack["root"] / "seed.yaml"))
    model = get_task(spec.task).build_model(seed=123)
    mlflow.set_experiment(f"fedward/{NAME}")
    with mlflow.start_run(run_name="seed champion"):
        info = mlflow.pytorch.log_model(model, name="global-model", registered_model_name=NAME, serialization_format="pickle",
                                        input_example=torch.zeros((1, N_FEATURES)).numpy())
    version = str(info.registered_model_version)
    MlflowClient().set_registered_model_alias(NAME, "champion", version)
    return version


@pytest.fixture(scope="module")
def scheduled(stack, seeded_champion):
    """The retraining deployment on an interval schedule, picked up by the stack's worker."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    from flows.deployments import TRAINING, Deployment, deploy

    tmp = stack["root"] / "scheduled"
    tmp.mkdir()
    spec_path = write_spec(tmp / "fed.yaml")
    d = Deployment("ops-heart-retraining", TRAINING, {"spec_path": "federations/heart-disease.yaml"}, cron="0 2 * * 1")
    now = dt.datetime.now(dt.timezone.utc)
    deployment_id = deploy(d, "fedward", interval=dt.timedelta(seconds=60), anchor=now - dt.timedelta(seconds=55),
                           parameters={"spec_path": str(spec_path), "workdir": str(tmp / "runs"),
                                       "summary_path": str(tmp / "summary.json")})
    deadline = time.monotonic() + 480
    run = None
    with get_client(sync_client=True) as client:
        dep_filter = DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id]))
        while time.monotonic() < deadline:
            runs = [r for r in client.read_flow_runs(deployment_filter=dep_filter) if r.state and not r.state.is_scheduled()]
            started = [r for r in runs if not r.state.is_cancelled()]
            if started:
                client.pause_deployment(deployment_id)  # one federation is enough; later runs would be cancelled anyway
                run = client.read_flow_run(started[0].id)
                if run.state.is_final():
                    break
            time.sleep(2)
        deployment = client.read_deployment(deployment_id)
        client.pause_deployment(deployment_id)
    assert run is not None and run.state.is_final(), f"no scheduled run finished within 480 s: {run and run.state}"
    summary = json.loads((tmp / "summary.json").read_text()) if (tmp / "summary.json").exists() else None
    return {"run": run, "deployment": deployment, "deployment_id": deployment_id, "summary": summary,
            "spec": load_spec(spec_path), "seed_version": seeded_champion}


@pytest.fixture(scope="module")
def worse(stack, scheduled):
    """A retraining that learns almost nothing (1 round of 1 step at a tiny learning rate), run in-process."""
    from flows.federated_training import federated_training

    tmp = stack["root"] / "worse"
    tmp.mkdir()
    spec_path = write_spec(tmp / "fed.yaml", rounds=1, local_steps=1, learning_rate=1e-6)
    return {"summary": federated_training(str(spec_path), workdir=str(tmp / "runs")), "spec": load_spec(spec_path)}


def with_cases(summary: dict) -> dict:
    scores = dict(summary["scores"])
    run = MlflowClient().get_run(summary["mlflow_run_id"])
    scores["_cases"] = {s: {"test_cases": int(run.data.params[f"test_cases.{s}"])} for s in SITES}
    return scores


# --------------------------------------------------------------------------- tests

def test_stack_is_loopback_only_and_up_is_idempotent(stack):
    for port in stack["ports"].values():
        addrs = listening(port)
        assert addrs, f"nothing listens on {port}"
        assert addrs <= {"0100007F", "00000000000000000000000001000000", "0000000000000000FFFF00000100007F"}, addrs
    again = make("stack", stack["env"])
    assert again.returncode == 0, again.stderr
    for service, pid in stack["pids"].items():
        assert f"{service}: already running (pid {pid})" in again.stdout
    env_file = (stack["root"] / "stack.env").read_text()
    assert f"PREFECT_API_URL={stack['urls']['prefect']}" in env_file and f"MLFLOW_TRACKING_URI={stack['urls']['mlflow']}" in env_file
    creds = json.loads((stack["root"] / "s3-credentials.json").read_text())
    assert (stack["root"] / "s3-credentials.json").stat().st_mode & 0o077 == 0  # secrets readable by the owner only
    # compose's S3 healthcheck command (an authenticated bucket listing), run against the real S3 server
    lsd = subprocess.run([str(RCLONE), "lsd", ":s3:", "--s3-provider=Other", f"--s3-endpoint={stack['urls']['s3']}",
                          f"--s3-access-key-id={creds['key']}", f"--s3-secret-access-key={creds['secret']}"],
                         capture_output=True, text=True, timeout=60)
    assert lsd.returncode == 0 and lsd.stdout.split()[-1] == "fedward", lsd.stdout + lsd.stderr
    bad = subprocess.run([str(RCLONE), "lsd", ":s3:", "--s3-provider=Other", f"--s3-endpoint={stack['urls']['s3']}",
                          f"--s3-access-key-id={creds['key']}", "--s3-secret-access-key=wrong", "--low-level-retries=1",
                          "--retries=1"], capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0  # the S3 server checks signatures


def test_scheduled_deployment_fires_through_the_worker(stack, scheduled):
    run, deployment = scheduled["run"], scheduled["deployment"]
    assert run.state.is_completed(), f"{run.state.type}: {run.state.message}"
    assert run.auto_scheduled  # created by the server's scheduler from the interval schedule, not triggered by hand
    assert run.deployment_id is not None and str(run.deployment_id) == scheduled["deployment_id"]
    assert run.work_pool_name == "fedward"
    assert deployment.schedules and deployment.schedules[0].schedule.interval == dt.timedelta(seconds=60)
    # one federation at a time: a run due while one is going is cancelled, not queued (same aggregator port)
    assert deployment.global_concurrency_limit.limit == 1
    assert deployment.concurrency_options.collision_strategy == "CANCEL_NEW"
    assert deployment.pull_steps == [{"prefect.deployments.steps.set_working_directory": {"directory": str(REPO)}}]
    worker_log = (stack["root"] / "logs" / "worker.log").read_text()
    assert str(run.id) in worker_log and "submitted to infrastructure" in worker_log
    assert scheduled["summary"] is not None and scheduled["summary"]["rounds"] == 5


def test_a_better_retrained_model_replaces_the_champion(scheduled):
    s = scheduled["summary"]
    scores = with_cases(s)
    assert weighted(scores, "global") > weighted(scores, "champion") + 0.1  # the premise, measured at the sites
    assert s["gate"]["passed"]
    assert s["promotion"]["alias"] == "champion" and s["promotion"]["champion_before"] == scheduled["seed_version"]
    assert s["promotion"]["reason"].startswith("promoted: it passed the promotion gate and weighted by test cases")
    client = MlflowClient()
    new = s["registered_model"]["version"]
    assert client.get_model_version_by_alias(NAME, "champion").version == new
    v = client.get_model_version(NAME, new)
    assert v.tags["fedward.promotion"] == "champion" and v.tags["fedward.promotion.previous_champion"] == scheduled["seed_version"]
    assert "champion" not in client.get_model_version(NAME, scheduled["seed_version"]).aliases


def test_a_worse_retrained_model_stays_challenger_and_says_why(scheduled, worse):
    s = worse["summary"]
    scores = with_cases(s)
    champion = scheduled["summary"]["registered_model"]["version"]
    assert weighted(scores, "global") < weighted(scores, "champion")  # the premise, measured at the sites
    # every model here is ~the untrained one, so the gate passes on equal scores: the champion decides
    assert s["gate"]["passed"]
    assert s["promotion"]["alias"] == "challenger" and s["promotion"]["champion_before"] == champion
    reason = s["promotion"]["reason"]
    assert reason.startswith("not promoted: it passed the promotion gate but is not better than the champion")
    assert f"{weighted(scores, 'global'):.4f} < {weighted(scores, 'champion'):.4f} for champion version {champion}" in reason
    client = MlflowClient()
    assert client.get_model_version_by_alias(NAME, "champion").version == champion  # did not move
    new = s["registered_model"]["version"]
    assert client.get_model_version_by_alias(NAME, "challenger").version == new
    v = client.get_model_version(NAME, new)
    assert v.tags["fedward.promotion"] == "challenger" and v.tags["fedward.promotion.reason"] == reason
    # the champion's scores in this run equal its scores as the new model of the scheduled run (same model, same sites)
    for site in SITES:
        assert scores[site]["champion"] == pytest.approx(scheduled["summary"]["scores"][site]["global"])


def test_model_card_and_version_tags_are_complete(scheduled):
    s, spec = scheduled["summary"], scheduled["spec"]
    client = MlflowClient()
    v = client.get_model_version(NAME, s["registered_model"]["version"])
    run = client.get_run(s["mlflow_run_id"])
    t = v.tags
    assert t["fedward.sites"] == "cleveland,hungary"
    assert json.loads(t["fedward.cases"]) == {site: {"train": int(run.data.params[f"train_cases.{site}"]),
                                                    "test": int(run.data.params[f"test_cases.{site}"])} for site in SITES}
    assert (t["fedward.algorithm"], t["fedward.rounds"], t["fedward.metric"]) == ("fedavg", "5", "accuracy")
    for site in SITES:
        assert float(t[f"fedward.accuracy.{site}"]) == pytest.approx(s["scores"][site]["global"], abs=5e-5)
    assert (t["fedward.epsilon"], t["fedward.delta"]) == ("none", "none")  # no DP in this federation
    assert t["fedward.gate"] == "passed" and t["fedward.gate.rule"] == "weighted_mean"
    assert t["fedward.audit.head"] == run.data.tags["fedward.audit.head"] == s["audit_log"]["head"]
    assert re.fullmatch(r"[0-9a-f]{64}", t["fedward.audit.head"])
    assert t["fedward.plan_hash"] == run.data.params["plan_hash"]
    assert t["fedward.image_digests"] == "none" and t["fedward.run_id"] == run.info.run_id
    card = v.description
    for heading in ("# Model card: ops-heart, version", "**Status:** `@champion`", "**Promotion gate (weighted_mean): PASSED**",
                    "## What it is", "## Sites, cases and scores", "## Privacy", "## Intended use and limits", "## Provenance"):
        assert heading in card, heading
    for site in SITES:
        row = next(line for line in card.splitlines() if line.startswith(f"| {site} |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[1] == f"Test controller of {site}"
        cases = json.loads(t["fedward.cases"])[site]
        assert [int(cells[2]), int(cells[3])] == [cases["train"], cases["test"]]
        assert float(cells[4]) == pytest.approx(s["scores"][site]["global"], abs=5e-5)
        assert float(cells[6]) == pytest.approx(s["scores"][site]["champion"], abs=5e-5)
    assert "Differential privacy: none" in card and "Art. 6(1)(e)" in card and "Art. 9(2)(j)" in card
    assert f"head hash `{t['fedward.audit.head']}`" in card and f"`{t['fedward.plan_hash']}`" in card
    assert f"MLflow run: `{run.info.run_id}`" in card
    artifact = Path(client.download_artifacts(run.info.run_id, "model-card/MODEL_CARD.md"))
    assert artifact.read_text() == card


def test_audit_log_and_dpia_annex_are_artifacts_on_s3(stack, scheduled):
    import boto3

    s, spec = scheduled["summary"], scheduled["spec"]
    client = MlflowClient()
    run = client.get_run(s["mlflow_run_id"])
    local = Path(client.download_artifacts(run.info.run_id, "audit/audit.jsonl"))
    result = verify(local, expect_head=run.data.tags["fedward.audit.head"])
    assert result.ok, result.problems
    assert run.data.tags["fedward.audit.records"] == str(result.records) and run.data.tags["fedward.audit.verified"] == "yes"
    recs = [json.loads(line) for line in local.read_text().splitlines()]
    kinds = [r["kind"] for r in recs]
    assert kinds[0] == "federation_checked" and kinds[1:3] == ["plan_shipped", "plan_shipped"]
    # after the rounds: each site's local-only model scored at the other site (no DP here: cross_site), then the model
    assert kinds[-5:] == ["federation_finished", "local_model_shared", "local_model_shared", "model_registered", "promotion"]
    assert {r["data"]["site"] for r in recs[-4:-2]} == set(SITES)
    assert recs[0]["data"]["sites"]["hungary"]["dpa"]["reference"] == "TEST-DPA-hungary"
    assert {r["data"]["site"] for r in recs if r["kind"] == "plan_shipped"} == set(SITES)
    updates = [r["data"] for r in recs if r["kind"] == "update_received"]
    # every site, every round, every task: one record each
    assert sorted((u["site"], u["round"], u["task"]) for u in updates) == sorted(
        (site, rnd, task) for site in SITES for rnd in range(5)
        for task in ("aggregated_model_validation", "train", "locally_tuned_model_validation"))
    expected = dpia.train_update_bytes(spec)
    assert {u["bytes"] for u in updates if u["task"] == "train"} == {expected}  # what the annex says leaves a site, exactly
    assert all(re.fullmatch(r"[0-9a-f]{64}", u["sha256"]) and u["dp"] is None for u in updates)
    assert len({u["sha256"] for u in updates if u["task"] == "train"}) == 10  # every update is a different model
    reg = next(r["data"] for r in recs if r["kind"] == "model_registered")
    assert reg["version"] == s["registered_model"]["version"]
    # the artifacts are objects in the S3 bucket, byte for byte
    creds = json.loads((stack["root"] / "s3-credentials.json").read_text())
    s3 = boto3.client("s3", endpoint_url=stack["urls"]["s3"], aws_access_key_id=creds["key"],
                      aws_secret_access_key=creds["secret"], region_name="us-east-1")
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="fedward", Prefix="artifacts/")["Contents"]]
    audit_key = next(k for k in keys if k.endswith(f"{run.info.run_id}/artifacts/audit/audit.jsonl"))
    assert s3.get_object(Bucket="fedward", Key=audit_key)["Body"].read() == local.read_bytes()
    annex_keys = [k for k in keys if f"{run.info.run_id}/artifacts/dpia/" in k]
    assert sorted(k.rsplit("/", 1)[1] for k in annex_keys) == ["annex.md", "annex.pdf"]
    annex = s3.get_object(Bucket="fedward", Key=next(k for k in annex_keys if k.endswith(".md")))["Body"].read().decode()
    assert "TEST-DPA-cleveland of 2026-01-15, valid until 2099-12-31" in annex and "`model.linear.weight` | 1 x 13 | float32 | 52" in annex
    assert f"{expected:,} bytes in all" in annex
    pdf = s3.get_object(Bucket="fedward", Key=next(k for k in annex_keys if k.endswith(".pdf")))["Body"].read()
    assert pdf.startswith(b"%PDF") and b"/Type /Page" in pdf


def test_stack_down_stops_every_process(stack):
    down = make("stack-down", stack["env"])
    assert down.returncode == 0, down.stderr
    for service, pid in stack["pids"].items():
        assert f"{service}: stopped (pid {pid})" in down.stdout
        alive = [p for p in Path("/proc").glob("[0-9]*/stat")
                 if _pgid_and_state(p) is not None and _pgid_and_state(p)[0] == pid and _pgid_and_state(p)[1] != "Z"]
        assert alive == [], f"{service}: processes left in its group: {alive}"
    for port in stack["ports"].values():
        assert listening(port) == set()
    again = make("stack-down", stack["env"])
    assert again.returncode == 0 and again.stdout.count("not running") == 4


def _pgid_and_state(stat: Path):
    try:
        fields = stat.read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[2]), fields[0]
