"""Differential privacy in real federations: OpenFL over gRPC with mutual TLS, one collaborator process
per site, real PneumoniaMNIST sites, and (for the flows) real Prefect and MLflow servers.

- the budget stop: a run that would exceed target_epsilon ends after the last round within it,
  says so, is not a failure, and registers that round's model tagged with its ε and δ;
- a collaborator killed mid-run and restarted keeps the ε it had spent;
- client-level DP with the noise at the server: the aggregator's noise, its ε, and its stop;
- the privacy-sweep flow (parent run, one child per noise level, table and plot) and the audit
  flow (images stay at the site, only numbers reach MLflow).

ε is checked against Opacus's accountant fed the mechanism's parameters computed here from first
principles (sample rate 1/ceil(N/B), steps per round), not against fedward's own schedule.
"""
from __future__ import annotations

import json
import math
import os
import re
import signal
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import yaml
from mlflow import MlflowClient

from conftest import free_port, site_governance
from flows import federated_training as ft
from flows.supervisor import EventTail, Supervisor
from sitekit.engine import openfl_adapter as engine
from sitekit.spec import load_spec

TRAIN = {"hospital-a": 405, "hospital-b": 297, "hospital-c": 198}  # the pneumonia_pool fixture's sites
STOP_SITES = ["hospital-a", "hospital-c"]  # unequal: the smaller one spends more per round


def rdp_epsilon(noise: float, sample_rate: float, steps: int, delta: float) -> float:
    from opacus.accountants import RDPAccountant

    acc = RDPAccountant()
    acc.history = [(noise, sample_rate, steps)]
    return acc.get_epsilon(delta=delta)


def dp_sgd_epsilon(site: str, rounds: int, batch: int, noise: float, delta: float, epochs: int = 1) -> float:
    batches = math.ceil(TRAIN[site] / batch)
    return rdp_epsilon(noise, 1 / batches, rounds * epochs * batches, delta)


def write_spec(tmp: Path, pool: dict, sites: list[str], privacy: dict | None, name: str, **top) -> Path:
    spec = {"name": name,
            "task": {"kind": "classification", "model": {"name": "cnn2d", "channels": [8, 16, 16]}, "input_size": [28, 28]},
            "sites": [{"name": s, "data": str(pool[s]), "governance": site_governance(s)} for s in sites],
            "rounds": 3, "local_epochs": 1, "batch_size": 32, "learning_rate": 0.002,
            "aggregator": {"host": "localhost", "port": free_port()},
            "timeouts": {"startup_seconds": 180, "round_seconds": 240}, **top}
    if privacy is not None:
        spec["privacy"] = privacy
    spec = {k: v for k, v in spec.items() if v is not None}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


# --------------------------------------------------------------------------- the budget stop, through the flow

@pytest.fixture(scope="module")
def stopped_run(pneumonia_pool, tmp_path_factory, prefect_server, mlflow_server):
    tmp = tmp_path_factory.mktemp("budget-stop")
    delta, noise = 1e-5, 1.0
    e1, e2 = (dp_sgd_epsilon("hospital-c", r, 32, noise, delta) for r in (1, 2))
    target = (e1 + e2) / 2  # round 1 fits at every site; round 2 does not fit at the smallest
    path = write_spec(tmp, pneumonia_pool, STOP_SITES, {"mode": "dp-sgd", "noise_multiplier": noise, "max_grad_norm": 1.0,
                                                          "target_epsilon": target, "delta": delta}, "budget-stop")
    summary = ft.federated_training(str(path), summary_path=str(tmp / "summary.json"), workdir=str(tmp / "runs"))
    return {"summary": summary, "target": target, "e1": e1, "spec": load_spec(path), "tmp": tmp}


def test_budget_stop_ends_the_run_after_the_last_round_within_budget(stopped_run):
    s, target = stopped_run["summary"], stopped_run["target"]
    assert s["rounds"] == 1 and s["planned_rounds"] == 3
    p = s["privacy"]
    assert p["stopped_for_budget"] and p["stop"]["by"] == "hospital-c" and p["stop"]["rounds_completed"] == 1
    assert p["stop"]["epsilon_next"] > target >= p["epsilon"]
    assert p["epsilon"] == pytest.approx(stopped_run["e1"], rel=1e-5)  # the worst site's, from Opacus directly
    assert set(p["per_site"]) == set(STOP_SITES)
    for site in STOP_SITES:
        assert p["per_site"][site]["epsilon"] == pytest.approx(dp_sgd_epsilon(site, 1, 32, 1.0, 1e-5), rel=1e-5)
        # each site's own accountant file: one round's steps, nothing spent on a round that was not run
        saved = json.loads((Path(s["workspace"]) / "sites" / site / engine.PRIVACY_STATE).read_text())
        assert [r["steps"] for r in saved["releases"]] == [math.ceil(TRAIN[site] / 32)]
    events = [json.loads(line) for line in (Path(s["workspace"]) / "aggregator" / engine.EVENTS).read_text().splitlines()]
    kinds = [e["event"] for e in events]
    assert kinds.index("privacy_budget_stop") < kinds.index("finished")
    assert not any(e["event"] == "assigned" and e["round"] >= 1 for e in events)  # round 2 never started
    finished = next(e for e in events if e["event"] == "finished")
    assert finished["rounds"] == 1 and finished["stopped_for_privacy_budget"]


def test_budget_stop_is_tagged_not_failed_and_the_model_within_budget_is_registered(stopped_run):
    s = stopped_run["summary"]
    client = MlflowClient()
    run = client.get_run(s["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["fedward.stop_reason"] == "privacy_budget" and run.data.tags["fedward.privacy.budget_stop"] == "true"
    assert run.data.params["privacy.mode"] == "dp-sgd" and run.data.params["privacy.accountant"] == "rdp"
    assert float(run.data.params["privacy.sample_rate.hospital-c"]) == pytest.approx(1 / 7, rel=1e-5)
    hist = client.get_metric_history(run.info.run_id, "privacy/epsilon")
    assert [m.step for m in hist] == [1] and hist[0].value == pytest.approx(s["privacy"]["epsilon"])
    assert run.data.metrics["final/privacy/hospital-a/epsilon"] == pytest.approx(s["privacy"]["per_site"]["hospital-a"]["epsilon"])
    reg = s["registered_model"]
    version = client.get_model_version(reg["name"], reg["version"])
    assert float(version.tags["fedward.privacy.epsilon"]) == pytest.approx(s["privacy"]["epsilon"], abs=1e-4)
    assert float(version.tags["fedward.privacy.delta"]) == 1e-5 and version.tags["fedward.stop_reason"] == "privacy_budget"
    # the registered weights are round 1's aggregate
    state, last_round = engine.read_global_model(Path(s["workspace"]) / "aggregator")
    assert last_round == 1
    loaded = mlflow.pytorch.load_model(f"models:/{reg['name']}/{reg['version']}")
    for k, v in loaded.state_dict().items():
        torch.testing.assert_close(v, state[k].to(v.dtype))


def test_audit_log_model_card_and_dpia_annex_carry_the_privacy_the_run_spent(stopped_run):
    """The governance records of a DP run: every training update's audit record names the DP it
    was trained under and the ε its site reported; the model card, its tags and the DPIA annex
    give the ε spent (not "none", and not merely the target)."""
    s = stopped_run["summary"]
    p = s["privacy"]
    records = [json.loads(line) for line in (Path(s["workspace"]) / "aggregator" / "audit.jsonl").read_text().splitlines()]
    updates = [r["data"] for r in records if r["kind"] == "update_received"]
    train = [u for u in updates if u["task"] == "train"]
    assert sorted(u["site"] for u in train) == sorted(STOP_SITES)  # one round, one update per site
    for u in train:
        assert u["dp"]["mode"] == "dp-sgd" and u["dp"]["clip"] == 1.0 and u["dp"]["noise_multiplier"] == 1.0
        assert u["dp"]["site_epsilon"] == pytest.approx(p["per_site"][u["site"]]["epsilon"], rel=1e-5)
        assert u["dp"]["site_delta"] == pytest.approx(1e-5, rel=1e-5)
    assert all(u["dp"] is None for u in updates if u["task"] != "train")
    # the annex's byte count, computed from the model and the metrics a DP site reports, is what arrived
    from flows import dpia

    assert {u["bytes"] for u in train} == {dpia.train_update_bytes(stopped_run["spec"])}
    client = MlflowClient()
    reg = s["registered_model"]
    version = client.get_model_version(reg["name"], reg["version"])
    assert float(version.tags["fedward.epsilon"]) == pytest.approx(p["epsilon"], abs=1e-4)
    assert float(version.tags["fedward.delta"]) == pytest.approx(1e-5)
    assert f"ε = {p['epsilon']:.4g} (spent in this run (worst site))" in version.description
    annex = (Path(s["workspace"]) / "dpia" / "annex.md").read_text()
    assert "Differential privacy (dp-sgd)" in annex and f"ε = {p['epsilon']:.4g}" in annex and "**none**" not in annex


# --------------------------------------------------------------------------- engine-level runs

def _wait(tail: EventTail, seen: list[dict], predicate, procs, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        seen.extend(tail.read())
        for ev in seen:
            if predicate(ev):
                return ev
        for p in procs:
            if p.poll() not in (None, 0):
                raise AssertionError(f"{p.name} exited with {p.poll()}: {p.failure_reason()}\n{p.log_tail(30)}")
        time.sleep(0.05)
    raise AssertionError(f"event not seen within {timeout} s; seen: {[e['event'] for e in seen]}")


def test_under_dp_no_local_only_model_leaves_its_site(stopped_run):
    """The local-only baselines are trained without DP, so under DP each one is scored only at its own
    site (local_baselines: own_site): no site holds or scores another site's local model, nothing is
    recorded as shared, the gate compares each site with its own, and the annex says they stay home."""
    s = stopped_run["summary"]
    ws = Path(s["workspace"])
    assert stopped_run["spec"].local_baselines == "own_site"
    for site in STOP_SITES:
        locals_ = {m for m in s["scores"][site] if m.startswith("local-")}
        assert locals_ == {f"local-{site}"}
        held = {p.name for p in (ws / "sites" / site / "models").iterdir()}
        assert not any(n.startswith("local-") and n != f"local-{site}.pt" for n in held), held
        assert s["sites"][site]["best_single_site_model"] == site
        assert s["gate"]["margins"][site] == pytest.approx(s["scores"][site]["global"] - s["scores"][site][f"local-{site}"])
    records = [json.loads(line) for line in (ws / "aggregator" / "audit.jsonl").read_text().splitlines()]
    assert not [r for r in records if r["kind"] == "local_model_shared"]
    text = Path(MlflowClient().download_artifacts(s["mlflow_run_id"], "dpia/annex.md", str(stopped_run["tmp"]))).read_text()
    assert "its local-only and personalised models" in text and "is sent to each other site" not in text


def test_collaborator_restart_keeps_the_spent_epsilon(pneumonia_pool, tmp_path):
    """hospital-c is killed (SIGKILL) as round 2 is handed to it and started again in its folder.
    Its round-2 ε must be two rounds' worth: a reset accountant would report one round's."""
    path = write_spec(tmp_path, pneumonia_pool, ["hospital-a", "hospital-c"],
                      {"mode": "dp-sgd", "noise_multiplier": 1.0, "max_grad_norm": 1.0, "delta": 1e-5}, "restart-dp")
    spec = load_spec(path)
    ws = ft.build_workspace.fn(spec, tmp_path / "runs")
    agg_dir, tail, seen = ws / "aggregator", EventTail(ws / "aggregator" / engine.EVENTS), []
    with Supervisor() as sup:
        agg = sup.start("aggregator", "aggregator", [*ft.ADAPTER, "aggregator"], agg_dir)
        _wait(tail, seen, lambda e: e["event"] == "listening", [agg], 120)
        sites = {s: sup.start(s, "site", [*ft.ADAPTER, "collaborator", "--name", s], ws / "sites" / s) for s in spec.site_names}
        _wait(tail, seen, lambda e: e["event"] == "assigned" and e["site"] == "hospital-c" and e["round"] == 1,
              [agg, *sites.values()], 240)
        old = sites["hospital-c"]
        os.killpg(old.proc.pid, signal.SIGKILL)
        old.proc.wait(timeout=10)
        killed_at = len(seen)
        sites["hospital-c"] = sup.start("hospital-c", "site", [*ft.ADAPTER, "collaborator", "--name", "hospital-c"],
                                        ws / "sites" / "hospital-c")
        _wait(tail, seen, lambda e: e["event"] == "finished", [agg, sites["hospital-a"], sites["hospital-c"]], 300)
    assert sites["hospital-c"].proc.pid != old.proc.pid and old.proc.returncode == -signal.SIGKILL
    assert any(e["event"] == "result" and e["site"] == "hospital-c" for e in seen[killed_at:])  # the new process took part
    ends = {e["round"]: e for e in seen if e["event"] == "round_end"}
    assert sorted(ends) == [0, 1, 2]
    reported = [ends[r]["sites"]["hospital-c"]["train/epsilon"] for r in (0, 1, 2)]
    one, two, three = (dp_sgd_epsilon("hospital-c", r, 32, 1.0, 1e-5) for r in (1, 2, 3))
    assert reported[0] == pytest.approx(one, rel=1e-5)
    assert reported[1] >= two * (1 - 1e-5)  # not reset by the restart (a reset would report `one` again)
    assert reported[2] >= three * (1 - 1e-5)
    saved = json.loads((ws / "sites" / "hospital-c" / engine.PRIVACY_STATE).read_text())
    assert saved["steps"] >= 3 * 7 and [r["round"] for r in saved["releases"]][:1] == [0]
    untouched = json.loads((ws / "sites" / "hospital-a" / engine.PRIVACY_STATE).read_text())
    assert untouched["steps"] == 3 * 13  # the other site's budget is its own


def test_client_dp_noise_at_the_server_and_the_aggregators_budget_stop(pneumonia_pool, tmp_path):
    """client-dp, 2 sites, z = 1, S = 0.1, noise at the aggregator; the target lets 2 of 3 rounds through."""
    z, clip, delta = 1.0, 0.1, 1e-5
    e = [rdp_epsilon(z, 1.0, r, delta) for r in (1, 2, 3)]
    path = write_spec(tmp_path, pneumonia_pool, ["hospital-a", "hospital-b"],
                      {"mode": "client-dp", "noise_multiplier": z, "clip_norm": clip, "noise_at": "server",
                       "delta": delta, "target_epsilon": (e[1] + e[2]) / 2}, "client-dp", local_steps=3, local_epochs=None)
    spec = load_spec(path)
    ws = ft.build_workspace.fn(spec, tmp_path / "runs")
    agg_dir, tail, seen = ws / "aggregator", EventTail(ws / "aggregator" / engine.EVENTS), []
    with Supervisor() as sup:
        agg = sup.start("aggregator", "aggregator", [*ft.ADAPTER, "aggregator"], agg_dir)
        _wait(tail, seen, lambda ev: ev["event"] == "listening", [agg], 120)
        sites = [sup.start(s, "site", [*ft.ADAPTER, "collaborator", "--name", s], ws / "sites" / s) for s in spec.site_names]
        finished = _wait(tail, seen, lambda ev: ev["event"] == "finished", [agg, *sites], 300)
    assert finished["rounds"] == 2 and finished["stopped_for_privacy_budget"]
    stop = next(ev for ev in seen if ev["event"] == "privacy_budget_stop")
    assert stop["by"] == "aggregator" and stop["epsilon_next"] == pytest.approx(e[2])
    ends = [ev for ev in seen if ev["event"] == "round_end"]
    assert [ev["server"]["privacy_epsilon"] for ev in ends] == [pytest.approx(e[0]), pytest.approx(e[1])]
    # the noise: two rounds of N(0, (zS/K)²) per parameter dwarf the clipped updates (at most S each)
    state, last_round = engine.read_global_model(agg_dir)
    assert last_round == 2
    from sitekit.tasks import get_task

    start = get_task(spec.task).build_model(seed=spec.seed).state_dict()
    moved = math.sqrt(sum(float(((state[k].double() - v.double()) ** 2).sum()) for k, v in start.items()))
    d = sum(v.numel() for v in start.values())
    expected = math.sqrt(2 * d) * z * clip / 2
    assert moved == pytest.approx(expected, rel=0.1)
    for s in spec.site_names:  # each site clipped its update (its log stays at the site)
        lines = [ln for ln in (ws / "sites" / s / "logs" / "site.log").read_text().splitlines() if "client-dp: update norm" in ln]
        clipped = [float(re.search(r"clipped to ([0-9.]+)", ln).group(1)) for ln in lines]
        assert len(clipped) == 2 and all(c <= clip + 1e-9 for c in clipped)


# --------------------------------------------------------------------------- the sweep and the audit flows

def test_privacy_sweep_logs_a_parent_run_with_one_child_per_level(pneumonia_pool, tmp_path, prefect_server, mlflow_server):
    from flows.privacy_sweep import privacy_sweep

    path = write_spec(tmp_path, pneumonia_pool, ["hospital-c"],  # one site: the sweep's mechanics, quickly
                      {"mode": "dp-sgd", "noise_multiplier": 1.0, "max_grad_norm": 1.0, "delta": 1e-5, "target_epsilon": 0.5},
                      "sweep", rounds=1)
    result = privacy_sweep(str(path), [0.0, 2.0], workdir=str(tmp_path / "runs"), summary_path=str(tmp_path / "sweep.json"))
    client = MlflowClient()
    parent = client.get_run(result["mlflow_run_id"])
    kids = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(kids) == 2 and all(k.info.status == "FINISHED" for k in kids)
    by_noise = {r["noise_multiplier"]: r for r in result["rows"]}
    assert math.isinf(by_noise[0.0]["epsilon"]) and by_noise[0.0]["delta"] is None
    private = client.get_run(by_noise[2.0]["mlflow_run_id"])
    assert private.data.params["privacy.noise_multiplier_given"] == "2.0"
    # the target was left out so the level ran its round: ε is Opacus's for one round at σ = 2
    assert by_noise[2.0]["epsilon"] == pytest.approx(dp_sgd_epsilon("hospital-c", 1, 32, 2.0, 1e-5), rel=1e-5)
    assert by_noise[2.0]["auc"] == pytest.approx(private.data.metrics["federation/global_model_auc"])
    arts = {a.path for a in client.list_artifacts(parent.info.run_id, "sweep")}
    assert {"sweep/privacy_utility.csv", "sweep/privacy_utility.png", "sweep/privacy_utility.txt"} <= arts
    csv_text = open(client.download_artifacts(parent.info.run_id, "sweep/privacy_utility.csv", str(tmp_path))).read()
    lines = csv_text.strip().splitlines()
    assert lines[0].startswith("noise_multiplier,epsilon,delta,auc") and lines[1].startswith("0.0,inf,")
    assert json.loads((tmp_path / "sweep.json").read_text())["rows"][0]["epsilon"] == "inf"
    # the levels are explorations: registered with their cards, but no alias moves (the level
    # without DP would otherwise become the champion of a DP federation)
    model = client.get_registered_model("sweep")
    assert not model.aliases
    for r in result["rows"]:
        v = client.get_model_version("sweep", r["registered_version"])
        assert v.tags["fedward.promotion"] == "exploration" and "privacy-sweep level" in v.tags["fedward.promotion.reason"]
        assert "**Status:** no alias" in v.description


def test_audit_keeps_images_at_the_site_and_sends_only_numbers(pneumonia_pool, tmp_path, prefect_server, mlflow_server):
    from flows.audit import audit_flow

    path = write_spec(tmp_path, pneumonia_pool, ["hospital-a", "hospital-c"],
                      {"mode": "dp-sgd", "noise_multiplier": 1.5, "max_grad_norm": 1.0, "delta": 1e-5}, "audit")
    report = audit_flow(str(path), "hospital-c", batch_sizes=[1, 2], iterations=20)
    folder = Path(report["site_folder"])
    assert folder.parent.name == "sites" and folder.name == "hospital-c"
    kept = {p.name for p in (folder / "audit").iterdir()}
    assert {"reconstructions.png", "reconstructions.npz", "report.json"} <= kept
    with np.load(folder / "audit" / "reconstructions.npz") as z:
        assert z["b1-no-dp/real"].shape == (1, 1, 28, 28)
    assert [(r["batch_size"], r["setting"]) for r in report["rows"]] == [(1, "no-dp"), (1, "dp-sgd"), (2, "no-dp"), (2, "dp-sgd")]
    assert report["rows"][1]["noise_multiplier"] == 1.5
    client = MlflowClient()
    run = client.get_run(report["mlflow_run_id"])
    assert run.data.tags["fedward.audit.site"] == "hospital-c"
    assert run.data.metrics["audit/b1/no-dp/psnr"] == pytest.approx(report["rows"][0]["psnr"])
    files = []
    stack = [""]
    while stack:
        for a in client.list_artifacts(run.info.run_id, stack.pop() or None):
            (stack.append(a.path) if a.is_dir else files.append(a.path))
    assert sorted(files) == ["audit/report.json", "audit/report.md"]  # no image, no array
    sent = json.loads(open(client.download_artifacts(run.info.run_id, "audit/report.json", str(tmp_path))).read())
    flat = json.dumps(sent)
    assert "reconstructions" not in flat and all(isinstance(r["psnr"], float) for r in sent["rows"])
