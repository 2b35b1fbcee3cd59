"""Prefect deployments of fedward's flows, declared here, created with ``fedward deploy``.

A deployment is a flow plus its parameters, a work pool and (optionally) a schedule, stored in
the Prefect server; a worker polling the pool runs it. fedward uses a *process* work pool: the
worker runs each flow run as a process on its own machine, from this repository's checkout
(``flow.from_source(<repo>)``), with the worker's environment (``PREFECT_API_URL``,
``MLFLOW_TRACKING_URI``, ``FEDWARD_DATA``) plus the deployment's.

To run them::

    .venv/bin/fedward deploy --pool fedward            # create/update every deployment below
    .venv/bin/prefect worker start --pool fedward --type process
    .venv/bin/prefect deployment run 'federated-training/heart-disease-on-demand'

``make stack`` starts a Prefect server *and* a worker on the pool ``fedward``.

Every federation deployment has a concurrency limit of one (a second run of the same
federation would collide on its aggregator port): a run due while the previous one is still
going is cancelled, not queued.
"""
from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TRAINING = "flows/federated_training.py:federated_training"
SWEEP = "flows/privacy_sweep.py:privacy_sweep"
AUDIT = "flows/audit.py:audit_flow"
IMAGES = "flows/site_images.py:build_site_images"


@dataclass(frozen=True)
class Deployment:
    name: str
    entrypoint: str  # "<file relative to the repo>:<flow function>"
    parameters: dict = field(default_factory=dict)
    cron: str | None = None  # None: runs only when triggered
    timezone: str = "Europe/London"
    description: str = ""
    tags: tuple[str, ...] = ()


DEPLOYMENTS: tuple[Deployment, ...] = (
    Deployment(
        "ixi-brain-weekly-retraining", TRAINING, {"spec_path": "federations/ixi-brain.yaml"},
        cron="0 2 * * 1",  # Mondays 02:00, when the hospitals' machines are quiet
        description="Periodic retraining of the IXI brain-mask federation; the new model replaces "
                    "ixi-brain@champion only if it is better at every site's test cases (else @challenger).",
        tags=("retraining", "ixi-brain"),
    ),
    Deployment(
        "heart-disease-on-demand", TRAINING, {"spec_path": "federations/heart-disease.yaml"},
        description="The 4-hospital heart-disease federation, run when triggered.",
        tags=("heart-disease",),
    ),
    Deployment(
        "pneumonia-dp-privacy-sweep", SWEEP,
        {"spec_path": "federations/pneumonia-dp.yaml", "noise_levels": [0.0, 0.5, 1.0, 2.0, 4.0]},
        description="The privacy-utility curve of the PneumoniaMNIST federation (one child run per noise level, "
                    "0 = without DP); no alias moves.",
        tags=("privacy", "pneumonia-dp"),
    ),
    Deployment(
        "pneumonia-dp-inversion-audit", AUDIT, {"spec_path": "federations/pneumonia-dp.yaml", "site": "hospital-c"},
        description="Gradient-inversion audit of what hospital-c would share (runs inside the site; numbers only "
                    "to MLflow).",
        tags=("privacy", "audit", "pneumonia-dp"),
    ),
    Deployment(
        "ixi-brain-site-images", IMAGES, {"spec_path": "federations/ixi-brain.yaml"},
        description="Build the aggregator image and one collaborator image per site (needs podman's Docker API "
                    "on the worker; see images/README.md).",
        tags=("images", "ixi-brain"),
    ),
)
# ship-plan is not declared: it takes each site's certificate request and image digests, which come
# from the sites at the time (README, For hospital IT); run it with `fedward ship`.


def ensure_process_pool(name: str) -> None:
    """Create the process work pool if it does not exist yet."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(name)
        except ObjectNotFound:
            try:
                client.create_work_pool(WorkPoolCreate(name=name, type="process"))
            except ObjectAlreadyExists:
                pass


def deploy(d: Deployment, work_pool: str = "fedward", *, interval: float | dt.timedelta | None = None,
           anchor: dt.datetime | None = None, parameters: dict | None = None, env: dict[str, str] | None = None,
           source: Path = REPO) -> str:
    """Create or update one deployment; return its id.

    ``interval`` replaces the declared cron schedule with an interval one (tests: cron fires at most
    once a minute); ``parameters`` and ``env`` are merged over the declared ones."""
    from prefect import flow as prefect_flow
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
    from prefect.schedules import Cron, Interval

    ensure_process_pool(work_pool)
    schedules = []
    if interval is not None:
        schedules.append(Interval(interval, anchor_date=anchor, timezone="UTC"))
    elif d.cron:
        schedules.append(Cron(d.cron, timezone=d.timezone))
    job_env = {k: v for k, v in {"FEDWARD_DATA": os.environ.get("FEDWARD_DATA")}.items() if v}
    job_env.update(env or {})
    loaded = prefect_flow.from_source(source=str(source), entrypoint=d.entrypoint)
    deployment_id = loaded.deploy(
        name=d.name, work_pool_name=work_pool, parameters={**d.parameters, **(parameters or {})},
        schedules=schedules, description=d.description, tags=list(d.tags),
        job_variables={"env": job_env} if job_env else None,
        concurrency_limit=ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW),
        build=False, push=False, print_next_steps=False,
    )
    return str(deployment_id)


def deploy_all(work_pool: str = "fedward", only: list[str] | None = None) -> dict[str, str]:
    """Create or update every declared deployment (or those named in ``only``)."""
    names = {d.name for d in DEPLOYMENTS}
    unknown = sorted(set(only or []) - names)
    if unknown:
        raise SystemExit(f"fedward: no deployment named {unknown[0]!r}; declared: {', '.join(sorted(names))}")
    return {d.name: deploy(d, work_pool) for d in DEPLOYMENTS if not only or d.name in only}
