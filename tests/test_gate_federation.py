"""The promotion gate on real federations (OpenFL over gRPC+mTLS, Prefect, MLflow).

Refused: two real UCI heart-disease hospitals, one of whose labels are inverted (a site whose
"disease" column means the opposite: the most extreme label shift). FedAvg averages two models
that disagree in sign, so at the shifted site the global model loses to the site's own
local-only model, and the gate must refuse it, say where, and give it no ``candidate`` alias.

Accepted: the same two hospitals with their true labels. Pooling what both learn gives a model
at least as good (test-case weighted) as the better of the two single-site models; the gate must
pass it and alias it ``candidate``.

Both decisions are also checked against the scores the sites reported, so a gate that always
refused (or always passed) would fail one of the two tests.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from conftest import DATA, free_port, site_governance
from flows.federated_training import federated_training
from sitekit.tabular import inspect_site

HEART = DATA / "heart-disease"


def _flip_labels(src: Path, dst: Path) -> Path:
    """The same patients with the target inverted: num > 0 becomes 0, num == 0 becomes 1."""
    out = []
    for line in src.read_text().splitlines():
        if not line.strip():
            continue
        fields = line.split(",")
        fields[-1] = "0" if float(fields[-1]) > 0 else "1"
        out.append(",".join(fields))
    dst.write_text("\n".join(out) + "\n")
    return dst


def _spec(tmp: Path, name: str, hungary: Path, gate: str) -> Path:
    spec = {
        "name": name,
        "task": {"kind": "tabular", "dataset": "heart-disease", "model": {"name": "logreg"}, "standardise": "federated"},
        "sites": [{"name": "cleveland", "data": str(HEART / "processed.cleveland.data"), "governance": site_governance("cleveland")},
                  {"name": "hungary", "data": str(hungary), "governance": site_governance("hungary")}],
        "rounds": 5, "local_steps": 50, "batch_size": 4, "learning_rate": 0.01, "algorithm": "fedavg",
        "gate": gate, "aggregator": {"host": "localhost", "port": free_port()},
        "timeouts": {"startup_seconds": 120, "round_seconds": 120},
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def _version(summary: dict):
    reg = summary["registered_model"]
    return MlflowClient().get_model_version(reg["name"], reg["version"])


def test_gate_refuses_a_global_model_that_loses_to_a_shifted_sites_own_model(tmp_path, prefect_server, mlflow_server):
    flipped = _flip_labels(HEART / "processed.hungarian.data", tmp_path / "hungary-flipped.data")
    summary = federated_training(str(_spec(tmp_path, "gate-shifted", flipped, "every_site")), workdir=str(tmp_path / "runs"))
    s = summary["scores"]
    # the shifted site's own model is clearly better there than the compromise the federation made
    assert s["hungary"]["local-hungary"] > s["hungary"]["global"] + 0.1
    assert summary["gate"]["passed"] is False
    assert "refused" in summary["gate"]["reason"] and "'hungary'" in summary["gate"]["reason"]
    assert summary["gate"]["margins"]["hungary"] == pytest.approx(s["hungary"]["global"] - s["hungary"]["local-hungary"])

    run = MlflowClient().get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["fedward.gate"] == "refused" and "'hungary'" in run.data.tags["fedward.gate.reason"]
    version = _version(summary)
    assert version.tags["fedward.gate"] == "refused"
    assert "candidate" not in version.aliases
    arts = {a.path for a in MlflowClient().list_artifacts(summary["mlflow_run_id"], "comparison")}
    assert {"comparison/sites.csv", "comparison/sites.png"} <= arts


def test_gate_accepts_a_global_model_better_than_the_best_single_site(tmp_path, prefect_server, mlflow_server):
    summary = federated_training(str(_spec(tmp_path, "gate-natural", HEART / "processed.hungarian.data", "weighted_mean")),
                                 workdir=str(tmp_path / "runs"))
    s = summary["scores"]
    n = {k: inspect_site(k, f)["test_cases"] for k, f in (("cleveland", HEART / "processed.cleveland.data"),
                                                          ("hungary", HEART / "processed.hungarian.data"))}
    weighted = lambda model: sum(s[k][model] * n[k] for k in n) / sum(n.values())  # noqa: E731
    best_local = max(weighted("local-cleveland"), weighted("local-hungary"))
    assert weighted("global") >= best_local  # the premise, measured in this run
    assert summary["gate"]["passed"] is True
    assert summary["gate"]["margins"]["weighted_mean"] == pytest.approx(weighted("global") - best_local)
    version = _version(summary)
    assert version.tags["fedward.gate"] == "passed"
    assert "candidate" in MlflowClient().get_model_version(version.name, version.version).aliases


def test_cross_site_scoring_records_every_local_model_that_left_its_site(tmp_path, prefect_server, mlflow_server):
    """Without DP the local-only models are scored at every site (local_baselines: cross_site, the
    default); each transfer is an audit record with the file's bytes and hash, and the DPIA annex
    of the run says so instead of claiming the local model stayed home."""
    import hashlib
    import json

    summary = federated_training(str(_spec(tmp_path, "gate-cross", HEART / "processed.hungarian.data", "every_site")),
                                 workdir=str(tmp_path / "runs"))
    ws = Path(summary["workspace"])
    assert set(summary["scores"]["cleveland"]) >= {"local-cleveland", "local-hungary"}
    records = [json.loads(x) for x in (ws / "aggregator" / "audit.jsonl").read_text().splitlines()]
    shared = {r["data"]["site"]: r["data"] for r in records if r["kind"] == "local_model_shared"}
    assert set(shared) == {"cleveland", "hungary"}
    for site, other in (("cleveland", "hungary"), ("hungary", "cleveland")):
        model = ws / "sites" / site / "local" / "model.pt"
        assert shared[site]["to_sites"] == [other]
        assert shared[site]["bytes"] == model.stat().st_size
        assert shared[site]["model_sha256"] == hashlib.sha256(model.read_bytes()).hexdigest()
    annex = MlflowClient().download_artifacts(summary["mlflow_run_id"], "dpia/annex.md", str(tmp_path))
    text = Path(annex).read_text()
    assert "local-only model (trained on that site's data alone" in text and "is sent to each other site" in text
