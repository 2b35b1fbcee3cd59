"""Governance records per site: every missing, premature or expired item is refused, naming the site,
the file and the field; the form of each item is checked when the spec is read; and the refusal
comes before any site process starts (CLI and flow) and before every round."""
from __future__ import annotations

import copy
import datetime as dt
import os
import subprocess
from pathlib import Path

import mlflow
import pytest
import yaml

from conftest import BIN, DATA, REPO, free_port, site_governance
from sitekit import governance
from sitekit.governance import GovernanceError, check_site_governance
from sitekit.spec import SpecError, load_spec

TODAY = dt.date(2026, 12, 4)
HEART = DATA / "heart-disease"


def spec_dict(tmp_path: Path, **overrides) -> dict:
    """Two real heart-disease hospitals with complete records (valid on TODAY)."""
    spec = {
        "name": "gov-test",
        "task": {"kind": "tabular", "dataset": "heart-disease", "model": {"name": "logreg"}},
        "sites": [{"name": "cleveland", "data": str(HEART / "processed.cleveland.data"), "governance": site_governance("cleveland")},
                  {"name": "hungary", "data": str(HEART / "processed.hungarian.data"), "governance": site_governance("hungary")}],
        "rounds": 2, "local_steps": 5, "batch_size": 4, "learning_rate": 0.01,
        "aggregator": {"host": "localhost", "port": free_port()},
        "timeouts": {"startup_seconds": 120, "round_seconds": 120},
    }
    spec.update(overrides)
    return spec


def write(tmp_path: Path, spec: dict) -> Path:
    path = tmp_path / "fed.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def assert_one_sentence(msg: str, *parts: str) -> None:
    assert msg.endswith((".", "?)")), msg
    assert ". " not in msg and "\n" not in msg, msg
    for p in parts:
        assert p in msg, (p, msg)


def test_complete_records_pass_and_example_specs_are_complete(tmp_path, monkeypatch):
    spec = load_spec(write(tmp_path, spec_dict(tmp_path)))
    assert governance.check_federation_governance(spec, TODAY) == {"cleveland": [], "hungary": []}
    g = spec.site("hungary").governance
    assert (g.role, g.art6, g.art9, g.dpa.reference, g.dpa.date, g.dpa.valid_until, g.dpia.date) == (
        "joint_controller", "e", "j", "TEST-DPA-hungary", dt.date(2026, 1, 15), dt.date(2099, 12, 31), dt.date(2026, 1, 8))
    monkeypatch.setenv("FEDWARD_DATA", str(DATA))
    for example in ("ixi-brain.yaml", "heart-disease.yaml"):
        ex = load_spec(REPO / "federations" / example)
        assert all(s.governance is not None for s in ex.sites)
        assert governance.check_federation_governance(ex, TODAY) == {s: [] for s in ex.site_names}, example
        assert all("demo record" in s.governance.controller for s in ex.sites)  # nobody mistakes them for real agreements


@pytest.mark.parametrize("path", [p for p, _ in governance.ITEMS])
def test_each_missing_item_is_refused_naming_site_and_field(tmp_path, path):
    spec = spec_dict(tmp_path)
    g = spec["sites"][1]["governance"]
    head, _, tail = path.partition(".")
    if tail:
        del g[head][tail]
    else:
        del g[head]
    loaded = load_spec(write(tmp_path, spec))  # the form is fine: an item may be pending when the spec is drafted
    assert check_site_governance(loaded, "cleveland", TODAY) == []
    problems = check_site_governance(loaded, "hungary", TODAY)
    assert len(problems) == 1, problems
    what = dict(governance.ITEMS)[path]
    assert_one_sentence(problems[0], str(loaded.path), "site 'hungary'", f"field 'sites[1].governance.{path}'", what)
    with pytest.raises(GovernanceError) as err:
        governance.require(loaded, TODAY)
    assert str(err.value) == problems[0]


@pytest.mark.parametrize("block", ["lawful_basis", "dpa", "dpia"])
def test_a_missing_block_names_each_of_its_items(tmp_path, block):
    spec = spec_dict(tmp_path)
    del spec["sites"][0]["governance"][block]
    problems = check_site_governance(load_spec(write(tmp_path, spec)), "cleveland", TODAY)
    expected = [p for p, _ in governance.ITEMS if p.startswith(block + ".")]
    assert [p.split("field '")[1].split("'")[0] for p in problems] == [f"sites[0].governance.{e}" for e in expected]


def test_site_without_any_governance_record(tmp_path):
    spec = spec_dict(tmp_path)
    del spec["sites"][0]["governance"]
    loaded = load_spec(write(tmp_path, spec))
    problems = check_site_governance(loaded, loaded.sites[0], TODAY)
    assert len(problems) == 1
    assert_one_sentence(problems[0], "site 'cleveland'", "field 'sites[0].governance'", "lawful basis", "data processing agreement")


@pytest.mark.parametrize("field, value, words", [
    ("dpa.date", "2026-12-05", "the data processing agreement of site 'hungary' is dated 2026-12-05, after today (2026-12-04)"),
    ("dpia.date", "2027-01-01", "the DPIA of site 'hungary' is dated 2027-01-01, after today (2026-12-04)"),
    ("dpa.valid_until", "2026-12-03", "the data processing agreement TEST-DPA-hungary of site 'hungary' expired on 2026-12-03"),
])
def test_future_dates_and_an_expired_agreement_are_refused(tmp_path, field, value, words):
    spec = spec_dict(tmp_path)
    head, tail = field.split(".")
    spec["sites"][1]["governance"][head][tail] = value
    if field == "dpa.date":  # keep the agreement's own dates consistent
        spec["sites"][1]["governance"]["dpa"]["valid_until"] = "2099-12-31"
    problems = check_site_governance(load_spec(write(tmp_path, spec)), "hungary", TODAY)
    assert len(problems) == 1, problems
    assert_one_sentence(problems[0], words, f"field 'sites[1].governance.{field}'")


def test_boundaries_signed_today_and_last_valid_day_are_accepted(tmp_path):
    spec = spec_dict(tmp_path)
    g = spec["sites"][1]["governance"]
    g["dpa"] = {"reference": "X", "date": TODAY.isoformat(), "valid_until": TODAY.isoformat()}
    g["dpia"]["date"] = TODAY.isoformat()
    loaded = load_spec(write(tmp_path, spec))
    assert check_site_governance(loaded, "hungary", TODAY) == []
    assert check_site_governance(loaded, "hungary", TODAY + dt.timedelta(days=1))[0].count("expired on") == 1


@pytest.mark.parametrize("mutate, field, words", [
    (lambda g: g.update(role="owner"), "role", "controller, joint_controller, processor"),
    (lambda g: g["lawful_basis"].update(art6="g"), "lawful_basis.art6", "Article 6(1) letter from a to f"),
    (lambda g: g["lawful_basis"].update(art9="k"), "lawful_basis.art9", "Article 9(2) letter from a to j"),
    (lambda g: g["lawful_basis"].update(art9="6(1)(e)"), "lawful_basis.art9", "Article 9(2)"),
    (lambda g: g["lawful_basis"].update(art6=5), "lawful_basis.art6", "Article 6(1)"),
    (lambda g: g["dpa"].update(date="15/01/2026"), "dpa.date", "YYYY-MM-DD"),
    (lambda g: g["dpia"].update(date="2026-02-30"), "dpia.date", "YYYY-MM-DD"),
    (lambda g: g["dpa"].update(valid_until="2025-01-01"), "dpa.valid_until", "before the agreement's date"),
    (lambda g: g["dpa"].update(expires="2030-01-01"), "dpa.expires", "allowed: reference, date, valid_until"),
    (lambda g: g.update(lawfull_basis={}), "lawfull_basis", "did you mean 'lawful_basis'"),
    (lambda g: g.update(data_use="x" * 501), "data_use", "keep it to 500"),
    (lambda g: g.update(controller=["a", "b"]), "controller", "must be text"),
])
def test_malformed_items_are_spec_errors(tmp_path, mutate, field, words):
    spec = spec_dict(tmp_path)
    mutate(spec["sites"][1]["governance"])
    path = write(tmp_path, spec)
    with pytest.raises(SpecError) as err:
        load_spec(path)
    assert_one_sentence(str(err.value), str(path), f"field 'sites[1].governance.{field}'", words)


@pytest.mark.parametrize("written, letter", [("e", "e"), ("(e)", "e"), ("E", "e"), ("6(1)(e)", "e"),
                                             ("Art. 6(1)(e)", "e"), ("GDPR Article 6(1)(a)", "a")])
def test_article_6_letters_in_the_forms_a_dpo_writes(tmp_path, written, letter):
    spec = spec_dict(tmp_path)
    spec["sites"][0]["governance"]["lawful_basis"]["art6"] = written
    spec["sites"][0]["governance"]["lawful_basis"]["art9"] = "Art. 9(2)(h)"
    g = load_spec(write(tmp_path, spec)).sites[0].governance
    assert (g.art6, g.art9) == (letter, "h")
    assert "Art. 9(2)(h) (preventive or occupational medicine" in g.lawful_basis_text()


def test_cli_refuses_before_prefect_or_any_site_process_starts(tmp_path):
    spec = spec_dict(tmp_path)
    spec["sites"][1]["governance"]["dpa"]["valid_until"] = "2020-01-01"
    spec["sites"][1]["governance"]["dpa"]["date"] = "2019-01-01"
    path = write(tmp_path, spec)
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    proc = subprocess.run([str(BIN / "fedward"), "run", str(path), "--workdir", str(tmp_path / "runs")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("fedward: ") and "site 'hungary'" in last and "expired on 2020-01-01" in last
    assert "Prefect" not in proc.stdout + proc.stderr  # answered without starting a flow run
    assert not (tmp_path / "runs").exists()


def test_flow_refuses_before_the_data_check_and_builds_nothing(tmp_path, prefect_server, mlflow_server):
    from flows.federated_training import federated_training

    spec = spec_dict(tmp_path)
    del spec["sites"][0]["governance"]["dpia"]["reference"]
    with pytest.raises(GovernanceError, match=r"site 'cleveland' has no DPIA reference on record \(field 'sites\[0\]\.governance\.dpia\.reference'\)"):
        federated_training(str(write(tmp_path, spec)), workdir=str(tmp_path / "runs"))
    assert not (tmp_path / "runs").exists()


def test_no_round_starts_for_a_site_whose_agreement_lapsed_after_the_plan_was_built(tmp_path):
    """The check is repeated where the rounds start (run-federated-rounds), not only at the top of the flow:
    a run that waited (for approvals, in a queue) past an agreement's last day must not start."""
    from flows import federated_training as ft

    lapsed = spec_dict(tmp_path)
    lapsed["sites"][0]["governance"]["dpa"].update(date="2020-01-01", valid_until=(dt.date.today() - dt.timedelta(days=1)).isoformat())
    spec = load_spec(write(tmp_path, lapsed))
    workspace = ft.build_workspace.fn(spec, tmp_path / "runs")  # built while it was still valid
    with pytest.raises(GovernanceError, match=r"^before round 1: .*agreement TEST-DPA-cleveland of site 'cleveland' expired on"):
        ft.run_rounds.fn(spec, workspace, 0.0)
    assert not (workspace / "aggregator" / "events.jsonl").exists()  # the aggregator never started


def test_an_agreement_lapsing_mid_run_stops_the_federation_at_the_next_round_boundary(tmp_path, monkeypatch, mlflow_server):
    """A real 2-site federation (OpenFL, mTLS) whose clock passes a DPA's last day after round 1: round 2 may
    already be in flight, but no later round starts, and the audit log shows it."""
    from flows import compliance
    from flows import federated_training as ft
    spec = load_spec(write(tmp_path, spec_dict(tmp_path, rounds=4, local_steps=400)))
    workspace = ft.build_workspace.fn(spec, tmp_path / "runs")
    calls = []

    def clock():
        calls.append(1)
        return TODAY if len(calls) == 1 else dt.date(2100, 1, 1)  # the day after every agreement in the spec

    monkeypatch.setattr(compliance, "today", clock)
    ft.tracking.configure("fedward/gov-test")
    with mlflow.start_run(), pytest.raises(GovernanceError, match=r"^before round 2: .*expired on 2099-12-31"):
        ft.run_rounds.fn(spec, workspace, 0.0)
    trained = {(r["data"]["site"], r["data"]["round"]) for r in compliance.audit_log(workspace).records()
               if r["kind"] == "update_received" and r["data"]["task"] == "train"}
    assert {("cleveland", 0), ("hungary", 0)} <= trained  # round 1 happened
    assert max(rnd for _, rnd in trained) <= 1  # round 3 never started


def test_the_aggregator_itself_starts_no_round_with_a_site_whose_agreement_lapsed(tmp_path):
    """A shipped federation runs its aggregator on its own (no flow watching): the lapse date travels in
    the plan and the aggregator refuses the round, says why, records it, and stops. Real OpenFL, mTLS."""
    import time

    from flows import compliance
    from flows import federated_training as ft
    from flows.supervisor import EventTail, Supervisor
    from sitekit.engine import openfl_adapter as engine

    lapsed = spec_dict(tmp_path)
    lapsed["sites"][1]["governance"]["dpa"].update(date="2020-01-01", valid_until="2021-06-30")
    spec = load_spec(write(tmp_path, lapsed))
    workspace = ft.build_workspace.fn(spec, tmp_path / "runs")
    plan = yaml.safe_load((workspace / "sites" / "cleveland" / engine.PLAN).read_text())
    assert plan["aggregator"]["settings"]["agreements_valid_until"] == {"cleveland": "2099-12-31", "hungary": "2021-06-30"}
    agg_dir = workspace / "aggregator"
    with Supervisor() as sup:
        agg = sup.start("aggregator", "aggregator", [*ft.ADAPTER, "aggregator"], agg_dir)
        tail, events = EventTail(agg_dir / engine.EVENTS), []
        deadline = time.monotonic() + 120
        while not any(e["event"] == "listening" for e in events) and time.monotonic() < deadline and agg.poll() is None:
            events += tail.read()
            time.sleep(0.2)
        for s in spec.sites:
            sup.start(s.name, "site", [*ft.ADAPTER, "collaborator", "--name", s.name], workspace / "sites" / s.name)
        deadline = time.monotonic() + 180
        while agg.poll() is None and time.monotonic() < deadline:
            events += tail.read()
            time.sleep(0.2)
        events += tail.read()
    assert agg.poll() == engine.EXIT_REFUSED, agg.log_tail(20)
    reason = "site 'hungary': its data processing agreement expired on 2021-06-30; no round is started with it"
    assert reason in agg.failure_reason()
    assert any(e["event"] == "failed" and reason in e["reason"] for e in events)
    recs = compliance.audit_log(workspace).records()
    refused = [r["data"] for r in recs if r["kind"] == "round_refused"]
    assert len(refused) == 1 and refused[0]["site"] == "hungary" and refused[0]["round"] == 0
    assert not [r for r in recs if r["kind"] == "update_received" and r["data"]["site"] == "hungary"]
    assert not [r for r in recs if r["kind"] == "update_received" and r["data"]["task"] == "train"]  # no round trained


def test_ship_plan_refuses_before_any_bundle_is_made(tmp_path, prefect_server, mlflow_server):
    from flows.ship_plan import ship_plan

    spec = spec_dict(tmp_path)
    spec["sites"][1]["governance"]["dpia"]["date"] = (dt.date.today() + dt.timedelta(days=30)).isoformat()
    with pytest.raises(GovernanceError, match=r"the DPIA of site 'hungary' is dated .*after today"):
        ship_plan(str(write(tmp_path, spec)), {"cleveland": "x.csr", "hungary": "y.csr"}, None,
                  s3_endpoint="http://127.0.0.1:9", workdir=str(tmp_path / "federation"))
    assert not (tmp_path / "federation").exists()  # no CA, no aggregator folder, no bundle, nothing uploaded


@pytest.mark.parametrize("extra, words", [
    (["--csr", "hospital-a"], "--csr 'hospital-a' must be SITE=PATH"),
    (["--csr", "hospital-a=x.csr", "--images", "/nonexistent/images.json"], "--images /nonexistent/images.json cannot be read"),
])
def test_ship_refuses_bad_arguments_in_one_sentence(tmp_path, capsys, extra, words):
    # once: both were tracebacks (ValueError from dict(), FileNotFoundError)
    from flows.cli import main

    assert main(["ship", str(REPO / "federations" / "ixi-brain.yaml"), *extra]) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err
