"""Governance steps of the control plane: refuse sites without a lawful basis, keep the audit trail.

- :func:`check_governance` (a Prefect task): every site's governance record complete and in
  force today, before any site process touches data, before a plan is shipped, before a round.
- The run's audit log (``<workspace>/aggregator/audit.jsonl``, format in :mod:`sitekit.audit`):
  the checked governance records, every plan shipped, every update received (written by the
  aggregator as it arrives: site, round, task, bytes, tensor digest, DP parameters), the end of
  the federation, every model registered and every promotion decision.
- :func:`sealed_audit_log`: however the run ends, the log goes to MLflow as the artifact
  ``audit/audit.jsonl`` and its last hash becomes the run tag ``fedward.audit.head``.
"""
from __future__ import annotations

import contextlib
import datetime as dt
from pathlib import Path

import mlflow
from prefect import task
from prefect.cache_policies import NO_CACHE

from sitekit import governance, pki
from sitekit.audit import AuditLog, file_sha256, verify
from sitekit.engine import openfl_adapter as engine
from sitekit.governance import GovernanceError
from sitekit.spec import FederationSpec

HEAD_TAG = "fedward.audit.head"


def today() -> dt.date:
    """The date the governance checks use (one place, so a test can move the clock)."""
    return dt.date.today()


def audit_log(workspace: Path) -> AuditLog:
    """The federation's audit log: in the aggregator's folder, where the aggregator itself records
    every update it receives, and the control plane the rest."""
    return AuditLog(Path(workspace) / "aggregator" / engine.AUDIT)


@task(name="check-governance", cache_policy=NO_CACHE)
def check_governance(spec: FederationSpec, when: str = "before any site takes part") -> dict[str, dict]:
    """Refuse the run if any site lacks an item of its governance record, or one is not in force today."""
    day = today()
    governance.require(spec, day)
    print(f"governance: {len(spec.sites)} site(s) with controller, lawful basis, DPA, DPIA and data-use scope "
          f"on record and in force today ({day.isoformat()}), {when}")
    return governance.describe(spec)


def require_governance_now(spec: FederationSpec, moment: str) -> None:
    """The same check inside a running step (a round about to start); raises GovernanceError."""
    try:
        governance.require(spec, today())
    except GovernanceError as exc:
        raise GovernanceError(f"{moment}: {exc}") from None


@task(name="record-plans-shipped", cache_policy=NO_CACHE)
def record_plans_shipped(spec: FederationSpec, workspace: Path) -> str:
    """Open the run's audit log: the governance records checked, then one record per site for its plan."""
    log = audit_log(workspace)
    log.append("federation_checked", federation=spec.name, spec_sha256=file_sha256(spec.path),
               date=today().isoformat(), sites=governance.describe(spec))
    for s in spec.sites:
        folder = workspace / "sites" / s.name
        paths = engine.participant_layout(folder, "site", s.name)
        log.append("plan_shipped", site=s.name, plan_sha256=file_sha256(folder / engine.PLAN),
                   plan_hash=engine.plan_hash(folder), cols_sha256=file_sha256(folder / engine.COLS),
                   certificate_sha256=pki.fingerprint(paths["cert"].read_bytes()),
                   dpa=s.governance.dpa.reference if s.governance and s.governance.dpa else None)
    return log.head()


def record_bundles_shipped(spec: FederationSpec, aggregator_folder: Path, published: dict[str, dict],
                           plan_sha256: str) -> AuditLog:
    """The ship-plan flow's records, in the federation's audit log (the aggregator's folder): the
    governance records checked, then each site's bundle (fingerprint, plan hash, object, image digest).
    The presigned links are capabilities and are never recorded."""
    log = AuditLog(Path(aggregator_folder) / engine.AUDIT)
    log.append("federation_checked", federation=spec.name, spec_sha256=file_sha256(spec.path),
               date=today().isoformat(), sites=governance.describe(spec))
    for s in spec.sites:
        p = published[s.name]
        log.append("plan_shipped", site=s.name, plan_sha256=plan_sha256, bundle_fingerprint=p["fingerprint"],
                   object=p["object"], image=p.get("image"), image_digest=p.get("image_digest"),
                   dpa=s.governance.dpa.reference if s.governance and s.governance.dpa else None)
    return log


@contextlib.contextmanager
def sealed_audit_log(workspace: Path):
    """Inside an MLflow run: on the way out, however the block ends, record a failure if there was one,
    log the audit log as an artifact and tag the run with its head hash."""
    log = audit_log(workspace)
    try:
        yield log
    except BaseException as exc:
        with contextlib.suppress(Exception):
            log.append("federation_failed", reason=f"{type(exc).__name__}: {exc}"[:2000])
        raise
    finally:
        with contextlib.suppress(Exception):
            check = verify(log.path)
            mlflow.log_artifact(str(log.path), "audit")
            mlflow.set_tags({HEAD_TAG: check.head, "fedward.audit.records": str(check.records),
                             "fedward.audit.verified": "yes" if check.ok else "NO"})
