"""Every algorithm survives an aggregator restart mid-run with its server state intact.

A real federation (OpenFL over gRPC with mutual TLS, one collaborator process per site) is
started from a workspace built by the flow's own task. Once round 2 is committed the sites
are frozen (SIGSTOP, so no further round can complete: tabular rounds take well under a second)
and the aggregator is killed (SIGKILL: no chance to save anything on the way out) and started
again in the same folder; then the sites are thawed. The restarted aggregator must come back with exactly the server state it had
committed (SCAFFOLD's server variate, FedAdam/FedYogi's moments, the round count), and the
federation must then finish all rounds with the sites that never stopped.

Tabular sites (two real UCI heart-disease hospitals) keep this fast; FedBN needs normalisation
layers with parameters, so it runs on a small UNet over two real IXI sites.
"""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import DATA, free_port
from flows import federated_training as ft
from flows.supervisor import EventTail, Supervisor
from sitekit.engine import openfl_adapter as engine
from sitekit.spec import load_spec

HEART = DATA / "heart-disease"
ROUNDS = 4


def _tabular_spec(tmp: Path, algorithm: str) -> Path:
    spec = {
        "name": f"restart-{algorithm}",
        "task": {"kind": "tabular", "dataset": "heart-disease", "model": {"name": "logreg"}},
        "sites": [{"name": "cleveland", "data": str(HEART / "processed.cleveland.data")},
                  {"name": "hungary", "data": str(HEART / "processed.hungarian.data")}],
        "rounds": ROUNDS, "local_steps": 5, "batch_size": 4, "learning_rate": 0.01, "algorithm": algorithm,
        "aggregator": {"host": "localhost", "port": free_port()},
        "timeouts": {"startup_seconds": 120, "round_seconds": 120},
    }
    path = tmp / "fed.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def _fedbn_spec(tmp: Path, sites: dict[str, Path]) -> Path:
    spec = {
        "name": "restart-fedbn",
        "task": {"model": {"name": "unet3d", "channels": [4, 8, 16], "strides": [2, 2], "res_units": 0,
                           "norm": "instance_affine"}, "input_size": [32, 32, 32]},
        "sites": [{"name": n, "data": str(f)} for n, f in sites.items()],
        "rounds": ROUNDS, "local_steps": 2, "batch_size": 2, "learning_rate": 0.005, "algorithm": "fedbn",
        "aggregator": {"host": "localhost", "port": free_port()},
        "timeouts": {"startup_seconds": 120, "round_seconds": 180},
    }
    path = tmp / "fed.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def _wait(tail: EventTail, seen: list[dict], predicate, procs, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for ev in tail.read():
            seen.append(ev)
        for ev in seen:
            if predicate(ev):
                return ev
        for p in procs:
            if p.poll() not in (None, 0):
                raise AssertionError(f"{p.name} exited with {p.poll()}: {p.failure_reason()}\n{p.log_tail(30)}")
        time.sleep(0.1)
    raise AssertionError(f"event not seen within {timeout} s; seen: {[e['event'] for e in seen]}")


def _restart_mid_run(spec_path: Path, tmp: Path) -> dict:
    spec = load_spec(spec_path)
    workspace = ft.build_workspace.fn(spec, tmp / "runs")
    agg_dir = workspace / "aggregator"
    tail, seen = EventTail(agg_dir / engine.EVENTS), []
    with Supervisor() as sup:
        agg = sup.start("aggregator", "aggregator", [*ft.ADAPTER, "aggregator"], agg_dir)
        _wait(tail, seen, lambda e: e["event"] == "listening", [agg], 120)
        sites = [sup.start(s.name, "site", [*ft.ADAPTER, "collaborator", "--name", s.name], workspace / "sites" / s.name)
                 for s in spec.sites]
        _wait(tail, seen, lambda e: e["event"] == "round_end" and e["round"] == 1, [agg, *sites], 240)
        for s in sites:  # freeze the sites: no round can complete between here and the kill
            os.killpg(s.proc.pid, signal.SIGSTOP)
        os.killpg(agg.proc.pid, signal.SIGKILL)
        agg.proc.wait(timeout=10)
        agg2 = sup.start("aggregator", "aggregator", [*ft.ADAPTER, "aggregator"], agg_dir)
        restarted = _wait(tail, seen, lambda e: e["event"] == "started" and e.get("resumed"), [agg2], 120)
        # The last round committed before the restart finished. If every site's results for the
        # next round had reached the killed aggregator, the restarted one replays that round while
        # it recovers (emitting its round_end before "started"), so look up to "started".
        committed = [e for e in seen[:seen.index(restarted)] if e["event"] == "round_end"][-1]
        for s in sites:
            os.killpg(s.proc.pid, signal.SIGCONT)
        finished = _wait(tail, seen, lambda e: e["event"] == "finished", [agg2, *sites], 240)
        deadline = time.monotonic() + 30
        while agg2.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
    state, last_round = engine.read_global_model(agg_dir)
    return {"committed": committed, "restarted": restarted, "finished": finished, "events": seen,
            "state": state, "last_round": last_round, "agg_dir": agg_dir, "exit": agg2.poll()}


def _check(run: dict) -> None:
    # the restarted aggregator resumed right after the last committed round, with that round's server state
    done = run["committed"]["round"] + 1
    assert 2 <= done < ROUNDS, f"the kill should land mid-run, after round 2; it landed after round {done}"
    assert run["restarted"]["round"] == done
    assert run["restarted"]["server"] == run["committed"]["server"]
    assert run["committed"]["server"]["rounds_aggregated"] == done
    # ... and finished the run: the remaining rounds aggregated on top of it
    ends = [e for e in run["events"] if e["event"] == "round_end"]
    assert ends[-1]["round"] == ROUNDS - 1 and ends[-1]["server"]["rounds_aggregated"] == ROUNDS
    assert run["last_round"] == ROUNDS and run["exit"] == 0
    assert all(np.isfinite(v.numpy()).all() for v in run["state"].values())


@pytest.mark.parametrize("algorithm", ["fedavg", "fedprox", "scaffold", "fedadam", "fedyogi"])
def test_algorithm_survives_aggregator_restart(algorithm, tmp_path):
    run = _restart_mid_run(_tabular_spec(tmp_path, algorithm), tmp_path)
    _check(run)
    server = run["committed"]["server"]
    if algorithm in ("fedadam", "fedyogi"):
        # the moments were reloaded, not restarted from zero (a fresh v would be tau² everywhere)
        assert server["adaptive_v_mean"] > 1e-6 and run["restarted"]["server"]["adaptive_v_mean"] == server["adaptive_v_mean"]
        saved = np.load(run["agg_dir"] / engine.SERVER_STATE / f"round-{run['committed']['round'] + 1}.npz")
        assert any(k.startswith("opt/m/") for k in saved.files) and any(k.startswith("opt/v/") for k in saved.files)
    if algorithm == "scaffold":
        assert server["scaffold_c_norm"] > 0 and run["restarted"]["server"]["scaffold_c_norm"] == server["scaffold_c_norm"]


def test_fedbn_survives_aggregator_restart_and_keeps_norm_layers_at_the_sites(ixi_pool, tmp_path):
    run = _restart_mid_run(_fedbn_spec(tmp_path, ixi_pool), tmp_path)
    _check(run)
    # the aggregator never held a normalisation tensor; each site holds its own, and they differ
    from sitekit.algorithms import fedbn
    from sitekit.model import build_model

    spec = load_spec(tmp_path / "fed.yaml")
    norm_names = fedbn.local_tensor_names(build_model(spec.task))
    assert norm_names and not (norm_names & set(run["state"]))
    ws = run["agg_dir"].parent
    own = {s: engine.site_local_tensors(ws / "sites" / s) for s in spec.site_names}
    assert all(set(t) == norm_names for t in own.values())
    a, b = own.values()
    assert any(not np.allclose(a[k].numpy(), b[k].numpy()) for k in norm_names)
