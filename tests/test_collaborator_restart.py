"""SCAFFOLD: a site's own control variate stays at the site and survives a collaborator restart.

A real federation (OpenFL over gRPC with mutual TLS) of two heart-disease hospitals runs
SCAFFOLD for 3 rounds. Right after the aggregator has received hospital 'cleveland''s round-2
update, that collaborator is killed (SIGKILL) and started again in the same folder. In the next
round it must correct its steps with the variate c_i it computed in round 2, read back from its
own ``site_state/`` — not start again from zero — and the federation must finish.
"""
from __future__ import annotations

import os
import signal

import torch

from flows import federated_training as ft
from flows.supervisor import EventTail, Supervisor
from sitekit.engine import openfl_adapter as engine
from sitekit.spec import load_spec
from test_aggregator_restart import ROUNDS, _tabular_spec, _wait


def test_scaffold_site_variate_survives_a_collaborator_restart(tmp_path):
    # enough local steps that a round takes a moment: the kill lands before the next round's training
    spec_path = _tabular_spec(tmp_path, "scaffold")
    text = spec_path.read_text().replace("local_steps: 5", "local_steps: 1500").replace(f"rounds: {ROUNDS}", "rounds: 3")
    spec_path.write_text(text)
    spec = load_spec(spec_path)
    assert spec.local_steps == 1500 and spec.rounds == 3
    workspace = ft.build_workspace.fn(spec, tmp_path / "runs")
    agg_dir, site_dir = workspace / "aggregator", workspace / "sites" / "cleveland"
    state_file = site_dir / engine.SITE_STATE / "scaffold.pt"
    tail, seen = EventTail(agg_dir / engine.EVENTS), []
    with Supervisor() as sup:
        agg = sup.start("aggregator", "aggregator", [*ft.ADAPTER, "aggregator"], agg_dir)
        _wait(tail, seen, lambda e: e["event"] == "listening", [agg], 120)
        procs = {s.name: sup.start(s.name, "site", [*ft.ADAPTER, "collaborator", "--name", s.name],
                                   workspace / "sites" / s.name) for s in spec.sites}
        _wait(tail, seen, lambda e: e["event"] == "result" and e["site"] == "cleveland" and e["task"] == "train"
              and e["round"] == 1, [agg, *procs.values()], 240)
        os.killpg(procs["cleveland"].proc.pid, signal.SIGKILL)
        procs["cleveland"].proc.wait(timeout=10)
        saved = torch.load(state_file, weights_only=True)
        assert saved["round"] == 1, "the kill came too late to test the restart (round 2 already trained)"
        c_after_round_2 = saved["after"]
        assert sum(float(t.abs().sum()) for t in c_after_round_2) > 0

        restarted = sup.start("cleveland", "site", [*ft.ADAPTER, "collaborator", "--name", "cleveland"], site_dir)
        _wait(tail, seen, lambda e: e["event"] == "finished", [agg, restarted, procs["hungary"]], 240)

    final = torch.load(state_file, weights_only=True)
    assert final["round"] == 2  # the restarted site trained the last round
    # ... starting from the variate it had kept, not from zero
    for kept, used in zip(c_after_round_2, final["before"]):
        assert torch.equal(kept, used)
    # and the variate never left the site: the aggregator's folder holds no site_state
    assert not (agg_dir / engine.SITE_STATE).exists()
