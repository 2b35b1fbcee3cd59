"""Static checks of what cannot run here (infra/compose.yaml: no Docker engine on these machines) and of
the declared Prefect deployments. The stack that does run (make stack) is tested in test_operations.py."""
from __future__ import annotations

import importlib
import inspect
import re
from pathlib import Path

import yaml

from conftest import REPO

COMPOSE = REPO / "infra" / "compose.yaml"


def lock_version(package: str) -> str:
    for line in (REPO / "requirements.lock").read_text().splitlines():
        if line.lower().startswith(package.lower() + "=="):
            return line.split("==")[1].strip()
    raise AssertionError(f"{package} not in requirements.lock")


def test_compose_services_dependencies_and_loopback_ports():
    c = yaml.safe_load(COMPOSE.read_text())
    services = c["services"]
    assert set(services) == {"postgres", "s3", "mlflow", "prefect-server"}
    for name, svc in services.items():
        for dep in svc.get("depends_on", {}):
            assert dep in services, (name, dep)
            assert "healthcheck" in services[dep], f"{name} waits for {dep}'s health, which has no healthcheck"
        for port in svc.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"
        image = svc.get("image", "")
        assert image and not image.endswith(":latest") and ":" in image, f"{name}: pin the image ({image!r})"
    for volume in [v.split(":")[0] for s in services.values() for v in s.get("volumes", []) if not v.startswith("./")]:
        assert volume in c["volumes"]


def test_compose_mlflow_uses_postgres_and_s3_artifacts_and_prefect_uses_postgres():
    c = yaml.safe_load(COMPOSE.read_text())
    mlflow = c["services"]["mlflow"]
    cmd = " ".join(mlflow["command"])
    assert "--backend-store-uri=postgresql://fedward:${POSTGRES_PASSWORD}@postgres:5432/mlflow" in cmd
    assert "--artifacts-destination=s3://${S3_BUCKET:-fedward}/artifacts" in cmd and "--serve-artifacts" in cmd
    assert mlflow["environment"]["MLFLOW_S3_ENDPOINT_URL"] == "${S3_ENDPOINT_URL:-http://s3:9000}"
    assert mlflow["environment"]["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    prefect = c["services"]["prefect-server"]
    assert prefect["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"].startswith("postgresql+asyncpg://fedward:${POSTGRES_PASSWORD}@postgres:5432/prefect")
    # the databases the services name are the ones the init script creates
    init = (REPO / "infra" / "postgres-init.sql").read_text()
    assert re.findall(r"CREATE DATABASE (\w+)", init) == ["prefect", "mlflow"]
    # servers speak the client versions this repo pins
    assert prefect["image"] == f"prefecthq/prefect:{lock_version('prefect')}-python3.11"
    dockerfile = (REPO / "infra" / mlflow["build"]["dockerfile"]).read_text()
    assert f"mlflow=={lock_version('mlflow')}" in dockerfile and f"boto3=={lock_version('boto3')}" in dockerfile
    assert mlflow["image"].endswith(lock_version("mlflow"))
    # secrets come from infra/.env (git-ignored), never from the file
    assert "${POSTGRES_PASSWORD:?" in COMPOSE.read_text() and "infra/.env" in (REPO / ".gitignore").read_text()


def test_declared_deployments_point_at_real_flows_and_one_retrains_on_a_cron_schedule():
    from prefect.schedules import Cron

    from flows.deployments import DEPLOYMENTS

    assert len({d.name for d in DEPLOYMENTS}) == len(DEPLOYMENTS)
    for d in DEPLOYMENTS:
        path, func = d.entrypoint.split(":")
        assert (REPO / path).exists()
        module = importlib.import_module(path[:-3].replace("/", "."))
        assert getattr(module, func).name in ("federated-training", "privacy-sweep", "gradient-inversion-audit",
                                              "build-site-images")
        assert (REPO / d.parameters["spec_path"]).exists()
        # every parameter is one the flow takes, and every parameter it requires is given
        params = inspect.signature(getattr(module, func).fn).parameters
        assert set(d.parameters) <= set(params)
        assert {n for n, p in params.items() if p.default is inspect.Parameter.empty} <= set(d.parameters)
    assert {d.entrypoint.split(":")[1] for d in DEPLOYMENTS} >= {"federated_training", "privacy_sweep", "audit_flow"}
    cron = [d for d in DEPLOYMENTS if d.cron]
    assert cron and "retraining" in cron[0].name
    schedule = Cron(cron[0].cron, timezone=cron[0].timezone)
    assert schedule.cron == "0 2 * * 1"


def test_fedward_deploy_creates_every_declared_deployment(prefect_server, capsys):
    """`fedward deploy` on a real Prefect server: each declared deployment, its parameters, the process
    pool, pulling from this checkout, the cron schedule of the retraining one. (No worker polls this
    pool: nothing runs; the interval-scheduled run through a worker is in test_operations.py.)"""
    from prefect.client.orchestration import get_client

    from flows.cli import main
    from flows.deployments import DEPLOYMENTS

    pool = "deploy-test-pool"
    assert main(["deploy", "--pool", pool]) == 0
    printed = dict(re.findall(r"^(deployment \S+): ([0-9a-f-]{36})$", capsys.readouterr().out, re.M))
    assert set(printed) == {f"deployment {d.name}" for d in DEPLOYMENTS}
    with get_client(sync_client=True) as client:
        assert client.read_work_pool(pool).type == "process"
        try:
            for d in DEPLOYMENTS:
                dep = client.read_deployment(printed[f"deployment {d.name}"])
                assert dep.name == d.name and dep.work_pool_name == pool and dep.parameters == d.parameters
                assert dep.entrypoint == d.entrypoint
                assert dep.pull_steps == [{"prefect.deployments.steps.set_working_directory": {"directory": str(REPO)}}]
                if d.cron:
                    assert [(s.schedule.cron, s.schedule.timezone) for s in dep.schedules] == [(d.cron, d.timezone)]
                else:
                    assert dep.schedules == []
        finally:
            for d in DEPLOYMENTS:
                client.delete_deployment(printed[f"deployment {d.name}"])
