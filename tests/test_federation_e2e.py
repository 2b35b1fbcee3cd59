"""End to end: 2 real-IXI sites, 2 rounds, mTLS on, through a real Prefect server and MLflow server."""
import json

import mlflow
import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from conftest import free_port, write_spec
from flows.federated_training import federated_training
from sitekit.data import SiteVolumes
from sitekit.model import build_model
from sitekit.spec import load_spec


@pytest.fixture(scope="module")
def run(ixi_pool, tmp_path_factory, prefect_server, mlflow_server):
    tmp = tmp_path_factory.mktemp("e2e")
    spec_path = write_spec(tmp / "fed.yaml", ixi_pool, free_port())
    summary_path = tmp / "summary.json"
    summary = federated_training(str(spec_path), summary_path=str(summary_path), workdir=str(tmp / "runs"))
    return {"spec": load_spec(spec_path), "summary": summary, "summary_path": summary_path, "tmp": tmp}


def test_summary_json_has_the_promised_shape(run):
    written = json.loads(run["summary_path"].read_text())
    assert written["metric"] == "dice" and written["rounds"] == 2
    assert set(written["sites"]) == {"hospital-a", "hospital-b"}
    for row in written["sites"].values():
        assert 0.0 <= row["local"] <= 1.0 and 0.0 <= row["global"] <= 1.0
        assert row["best_single_site"] >= row["local"]  # the best includes the site's own model
        assert row["global_beats_best_single_site"] == (row["global"] >= row["best_single_site"])
    assert written["registered_model"]["name"] == "ixi-test"
    assert written["wall_seconds"] > 0
    assert written["mlflow_run_id"] == run["summary"]["mlflow_run_id"]


def test_mlflow_run_has_per_round_per_site_curves(run):
    client = MlflowClient()
    r = client.get_run(run["summary"]["mlflow_run_id"])
    assert r.info.status == "FINISHED"
    for site in ("hospital-a", "hospital-b"):
        # step = rounds completed: the initial model (0), after round 1, after round 2 (= the registered model)
        hist = sorted(client.get_metric_history(r.info.run_id, f"site/{site}/global_model_dice"), key=lambda m: m.step)
        assert [m.step for m in hist] == [0, 1, 2]
        assert hist[2].value == pytest.approx(run["summary"]["sites"][site]["global"])
        loss = sorted(client.get_metric_history(r.info.run_id, f"site/{site}/train_loss"), key=lambda m: m.step)
        assert [m.step for m in loss] == [1, 2] and loss[1].value < loss[0].value  # it learned something in round 2
    assert sorted(m.step for m in client.get_metric_history(r.info.run_id, "federation/global_model_dice")) == [0, 1, 2]
    # final metrics equal what the summary reports
    for site, row in run["summary"]["sites"].items():
        assert r.data.metrics[f"final/{site}/global_dice"] == pytest.approx(row["global"])
    assert r.data.params["tls"] == "True" and r.data.params["algorithm"] == "fedavg"
    arts = {a.path for a in client.list_artifacts(r.info.run_id)}
    assert {"federation", "openfl-plan", "comparison", "curves"} <= arts
    plan = client.download_artifacts(r.info.run_id, "openfl-plan/plan.yaml")
    assert "FedwardAggregator" in open(plan).read()


def test_registered_model_loads_predicts_and_is_the_federated_model(run):
    reg = run["summary"]["registered_model"]
    loaded = mlflow.pytorch.load_model(f"models:/{reg['name']}/{reg['version']}")
    ws = run["summary"]["workspace"]
    reference = build_model(run["spec"].task)
    reference.load_state_dict(torch.load(f"{ws}/models/global.pt", weights_only=True))
    reference.eval()
    loaded.eval()
    case = SiteVolumes("hospital-a", run["spec"].site("hospital-a").data, "test", (64, 64, 64))[0][0][None]
    with torch.no_grad():
        out = loaded(case)
        ref = reference(case)
    assert out.shape == (1, 2, 64, 64, 64)
    assert torch.allclose(out, ref, atol=1e-5)
    # and it is not the untrained initial model
    init = build_model(run["spec"].task, seed=0).eval()
    with torch.no_grad():
        assert not torch.allclose(init(case), out, atol=1e-3)


def test_one_plan_for_everyone_and_each_site_reads_only_its_folder(run):
    from pathlib import Path

    ws = Path(run["summary"]["workspace"])
    plans = {p.parent.parent.name: p.read_bytes() for p in ws.glob("**/plan/plan.yaml")}
    assert set(plans) == {"aggregator", "hospital-a", "hospital-b"}
    assert len(set(plans.values())) == 1
    for site in ("hospital-a", "hospital-b"):
        data_yaml = (ws / "sites" / site / "plan" / "data.yaml").read_text().strip().splitlines()
        assert data_yaml == [f"{site},{run['spec'].site(site).data}"]


def test_private_keys_stay_in_their_own_folder(run):
    ws = run["summary"]["workspace"]
    from pathlib import Path

    files = [p for p in Path(ws).rglob("*") if p.is_file()]
    for site in ("hospital-a", "hospital-b"):
        key = Path(ws) / "sites" / site / "cert" / "client" / f"col_{site}.key"
        secret = key.read_bytes()
        holders = [p for p in files if secret in p.read_bytes()]
        assert holders == [key]
    # nothing key-like was logged to MLflow either
    client = MlflowClient()
    local = client.download_artifacts(run["summary"]["mlflow_run_id"], "", dst_path=str(run["tmp"] / "arts"))
    for p in Path(local).rglob("*"):
        if p.is_file():
            assert b"PRIVATE KEY" not in p.read_bytes()


def test_round_timing_is_recorded(run):
    hist = run["summary"]["round_history"]
    assert [h["round"] for h in hist] == [0, 1]
    for h in hist:
        assert 0 < h["train_seconds"] < h["wall_seconds"]
    assert run["summary"]["timing"]["first_round_start_s"] > 0
    assert np.isfinite(hist[-1]["federation"]["train/train_loss"])
