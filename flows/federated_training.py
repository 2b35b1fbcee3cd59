"""The ``federated-training`` flow: the runbook for one federation, step by step.

validate spec -> check each site's data -> build workspace, plan and PKI -> run the rounds
(aggregator + one collaborator per site, supervised) -> train local-only baselines at each
site -> evaluate every model at every site -> log, compare, register.

The flow holds no FL maths and no OpenFL calls: those live in ``sitekit``.
"""
from __future__ import annotations

import datetime as dt
import json
import logging
import os
import shutil
import socket
import sys
import time
from pathlib import Path

os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT", "false")

import mlflow  # noqa: E402
from prefect import flow, task  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402

from flows import compliance, promotion  # noqa: E402
from flows import gate as gating  # noqa: E402
from flows import privacy as privacy_flow  # noqa: E402
from flows import tracking  # noqa: E402
from flows.supervisor import EventTail, FederationFailed, Supervisor  # noqa: E402
from sitekit import pki  # noqa: E402
from sitekit.data import DataError  # noqa: E402
from sitekit.governance import GovernanceError  # noqa: E402
from sitekit.engine import openfl_adapter as engine  # noqa: E402
from sitekit.spec import FederationSpec, SpecError, load_spec  # noqa: E402

ADAPTER = [ "-m", "sitekit.engine.openfl_adapter"]
SITEKIT = ["-m", "sitekit.cli"]


class PortInUse(ValueError):
    pass


# --------------------------------------------------------------------------- steps

@task(name="validate-spec", cache_policy=NO_CACHE)
def validate_spec(spec_path: str) -> FederationSpec:
    return load_spec(spec_path)


@task(name="check-site-data", cache_policy=NO_CACHE)
def check_site_data(spec: FederationSpec) -> dict[str, dict]:
    """Every case readable and consistent at every site, checked by each site's own process.

    Only aggregate counts come back to the control plane; a problem comes back as the site's
    one-sentence reason (naming its file), and stops the run before any participant starts.
    """
    import subprocess

    kind = ["--kind", spec.task.kind] + (["--dataset", spec.task.dataset] if spec.task.dataset else [])
    if spec.task.kind == "tabular" and spec.task.standardise == "federated":
        kind.append("--feature-sums")
    procs = {s.name: subprocess.Popen([sys.executable, *SITEKIT, "check-data", "--site", s.name, "--data", str(s.data), *kind],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
             for s in spec.sites}
    summaries, problems = {}, []
    for name, proc in procs.items():
        try:
            out, err = proc.communicate(timeout=spec.timeouts.startup_seconds)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            problems.append(f"site '{name}': checking its data took longer than {spec.timeouts.startup_seconds:.0f} s")
            continue
        if proc.returncode == 3:
            problems.append(err.strip().splitlines()[-1].removeprefix("sitekit: "))
        elif proc.returncode != 0:
            problems.append(f"site '{name}': the data check crashed: {err.strip().splitlines()[-1] if err.strip() else proc.returncode}")
        else:
            summaries[name] = s = json.loads(out.strip().splitlines()[-1])
            extra = (f", brain fraction {s['foreground_fraction']:.3f}" if "foreground_fraction" in s else
                     f", positive fraction {s['positive_fraction']:.3f}" if "positive_fraction" in s else "")
            print(f"site {name}: {s['train_cases']} training / {s['test_cases']} test cases{extra}")
    if problems:
        raise DataError(problems[0] if len(problems) == 1 else " | ".join(problems))
    return summaries


@task(name="federated-feature-statistics", cache_policy=NO_CACHE)
def federated_statistics(spec: FederationSpec, summaries: dict[str, dict]) -> FederationSpec:
    """One standardisation for every site from the sites' counts, sums and sums of squares.

    Each site's share is an aggregate over its training cases; no row leaves a site. The result
    (mean and std per feature, the same as the pooled statistics) goes into the plan."""
    import dataclasses

    from sitekit.tabular import federated_standardisation

    mean, std = federated_standardisation([summaries[s]["feature_sums"] for s in spec.site_names])
    for s in summaries.values():
        s.pop("feature_sums", None)
    print(f"federated standardisation from {len(spec.sites)} sites' feature sums "
          f"({sum(v['train_cases'] for v in summaries.values())} training cases)")
    return dataclasses.replace(spec, task=dataclasses.replace(spec.task, feature_stats=(tuple(mean), tuple(std))))


@task(name="check-aggregator-port", cache_policy=NO_CACHE)
def check_port_free(spec: FederationSpec) -> None:
    port = spec.aggregator.port
    for family, addr in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET, "0.0.0.0")):
        with socket.socket(family, socket.SOCK_STREAM) as s:
            try:
                s.bind((addr, port))
            except OSError:
                raise PortInUse(f"{spec.path}: field 'aggregator.port' is {port}, which is already in use on this "
                                "machine; stop what holds it or choose a free port.") from None


@task(name="build-workspace-plan-and-pki", cache_policy=NO_CACHE)
def build_workspace(spec: FederationSpec, workdir: Path) -> Path:
    """One plan for everyone, a federation CA, and a certificate per participant from its own CSR.

    Built in a temporary folder and renamed into place, so a failure leaves nothing half-written.
    """
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    final = workdir / f"{spec.name}-{stamp}"
    tmp = workdir / f".{spec.name}-{stamp}.partial"
    tmp.mkdir(parents=True)
    try:
        ca_cert = pki.create_ca(tmp / "ca", spec.name)
        participants = [("aggregator", spec.aggregator.host, tmp / "aggregator")]
        participants += [("site", s.name, tmp / "sites" / s.name) for s in spec.sites]
        for role, name, folder in participants:
            engine.write_plan(spec, folder, site=name if role == "site" else None)
            paths = engine.participant_layout(folder, role, name)
            # The key is generated inside the participant's folder; only the CSR is read from it.
            pki.make_key_and_request(paths["key"], paths["csr"], name, dns_name=name if role == "aggregator" else None)
            pki.sign_request(tmp / "ca", paths["csr"].read_bytes(), name, role, paths["cert"])
            shutil.copyfile(ca_cert, paths["chain"])
        engine.initialize_model(spec, tmp / "aggregator")
        shutil.copyfile(spec.path, tmp / "federation.yaml")
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


@task(name="run-federated-rounds", cache_policy=NO_CACHE)
def run_rounds(spec: FederationSpec, workspace: Path, t0: float) -> dict:
    """Start the aggregator and every site; follow the rounds; stop everything, whatever happens.

    t0 is the flow's start (epoch seconds), for the time-to-first-round figure."""
    agg_dir = workspace / "aggregator"
    history: list[dict] = []
    timing: dict = {}
    threads = os.environ.get("FEDWARD_TORCH_THREADS", "1")
    compliance.require_governance_now(spec, "before round 1")
    with Supervisor() as sup:
        agg = sup.start("aggregator", "aggregator", [*ADAPTER, "aggregator"], agg_dir)
        tail = EventTail(agg_dir / engine.EVENTS)
        deadline = time.monotonic() + spec.timeouts.startup_seconds
        while not any(e["event"] == "listening" for e in tail.read()):
            if agg.poll() is not None:
                raise FederationFailed("aggregator", f"did not start: {agg.failure_reason()}")
            if time.monotonic() > deadline:
                raise FederationFailed("aggregator", f"did not listen within {spec.timeouts.startup_seconds:.0f} s")
            time.sleep(0.1)
        timing["aggregator_listening_s"] = time.time() - t0
        sites = {s.name: sup.start(s.name, "site", [*ADAPTER, "collaborator", "--name", s.name],
                                   workspace / "sites" / s.name, env={"FEDWARD_TORCH_THREADS": threads})
                 for s in spec.sites}
        round_no, finished, rounds_completed, privacy_stop = 0, False, spec.rounds, None
        delivered: set[str] = set()
        last_progress = time.monotonic()
        round_started: dict[int, float] = {}
        while True:
            for ev in tail.read():
                last_progress = time.monotonic()
                if ev["event"] == "assigned":
                    round_started.setdefault(ev["round"], ev["time"])
                    timing.setdefault("first_round_start_s", ev["time"] - t0)
                elif ev["event"] == "result":
                    if ev["task"] == "train":
                        delivered.add(ev["site"])
                elif ev["event"] == "round_end":
                    wall = ev["time"] - round_started.get(ev["round"], ev["time"])
                    train = max((v.get("train/train_seconds", 0.0) for v in ev["sites"].values()), default=0.0)
                    entry = {"round": ev["round"], "wall_seconds": wall, "train_seconds": train,
                             "overhead_seconds": wall - train, "federation": ev["federation"], "sites": ev["sites"],
                             "server": ev.get("server", {})}
                    mlflow.log_metrics({"round/wall_seconds": wall, "round/train_seconds_slowest_site": train,
                                        "round/overhead_seconds": wall - train}, step=ev["round"] + 1)
                    history.append(entry)
                    tracking.log_round(ev["round"], ev["federation"], ev["sites"])
                    if spec.privacy is not None:
                        privacy_flow.log_round(spec, entry)
                    _print_round(spec, entry)
                    round_no, delivered = ev["round"] + 1, set()
                    if round_no < spec.rounds:  # a site's agreement may lapse while the federation runs
                        compliance.require_governance_now(spec, f"before round {round_no + 1}")
                elif ev["event"] == "privacy_budget_stop":
                    privacy_stop = {k: v for k, v in ev.items() if k not in ("event", "time")}
                    print(privacy_flow.stop_message(privacy_stop), flush=True)
                elif ev["event"] == "finished":
                    finished, rounds_completed = True, int(ev["rounds"])
                elif ev["event"] == "failed":
                    raise FederationFailed("aggregator", ev.get("reason", "failed"))
            if finished and agg.poll() is not None:
                break
            for name, p in [("aggregator", agg), *sites.items()]:
                rc = p.poll()
                if rc is None or (finished and rc == 0):
                    continue
                who = "aggregator" if name == "aggregator" else f"site '{name}'"
                if rc == 0:
                    raise FederationFailed(who, f"left the federation in round {round_no + 1} before it finished")
                raise FederationFailed(who, f"failed in round {round_no + 1}: {p.failure_reason()}")
            limit = spec.timeouts.startup_seconds if not history and not delivered else spec.timeouts.round_seconds
            if time.monotonic() - last_progress > limit:
                waiting = [s for s in spec.site_names if s not in delivered] or spec.site_names
                names = ", ".join(f"'{s}'" for s in waiting)
                raise FederationFailed(f"site {names}", f"sent no update for round {round_no + 1} within {limit:.0f} s (stuck or unreachable)")
            time.sleep(0.1)
        # Sites leave once told to quit; give them a bounded moment, then the Supervisor stops them.
        end = time.monotonic() + 15
        while any(p.poll() is None for p in sites.values()) and time.monotonic() < end:
            time.sleep(0.1)
    return {"history": history, "timing": timing, "rounds_completed": rounds_completed, "privacy_stop": privacy_stop}


def _print_round(spec: FederationSpec, entry: dict) -> None:
    fed, sites = entry["federation"], entry["sites"]
    key = f"aggregated_model_validation/{spec.task.metric}"
    score = fed.get(key, float("nan"))
    loss = fed.get("train/train_loss", float("nan"))
    per_site = "  ".join(f"{s} {v.get(key, float('nan')):.3f}" for s, v in sorted(sites.items()))
    if spec.privacy is not None:  # the training loss stays at the sites under DP; say what was spent instead
        eps = privacy_flow.round_epsilon(spec, entry)
        tail = "  ε " + (" ".join(f"{w} {v['epsilon']:.2f}" for w, v in sorted(eps.items())) if eps else "n/a")
    else:
        tail = f"  mean train loss {loss:.3f}"
    print(f"round {entry['round'] + 1}/{spec.rounds}: global-model {spec.task.metric} entering the round {score:.3f} [{per_site}]"
          f"{tail}  ({entry['wall_seconds']:.1f} s)", flush=True)


@task(name="train-local-only-baselines", cache_policy=NO_CACHE)
def train_local_baselines(spec: FederationSpec, workspace: Path, rounds: int | None = None) -> dict[str, Path]:
    """Each site trains on its own data alone with the federated run's budget (same total steps).

    ``rounds``: the rounds the federation completed, when fewer than planned."""
    extra = ["--rounds", str(rounds)] if rounds and rounds != spec.rounds else []
    with Supervisor() as sup:
        jobs = [sup.start(s.name, "site-job", [*SITEKIT, "train-local", "--workspace", ".", *extra], workspace / "sites" / s.name,
                          env={"FEDWARD_TORCH_THREADS": os.environ.get("FEDWARD_TORCH_THREADS", "1")})
                for s in spec.sites]
        sup.wait_all(jobs, timeout=spec.timeouts.round_seconds * spec.rounds, what="local-only training",
                     progress=_print_job_progress)
    return {s.name: workspace / "sites" / s.name / "local" / "model.pt" for s in spec.sites}


def _print_job_progress(jobs) -> None:
    """One line: how far each site's local-only training is (read from its job log)."""
    states = []
    for p in jobs:
        if p.poll() is not None:
            states.append(f"{p.name} done")
            continue
        epochs = [ln.split("epoch", 1)[1].split(":")[0].strip() for ln in p.log_tail(20).splitlines() if "local-only epoch" in ln]
        states.append(f"{p.name} " + (f"epoch {epochs[-1]}" if epochs else "loading data"))
    print("local-only baselines: " + ", ".join(states), flush=True)


@task(name="evaluate-at-every-site", cache_policy=NO_CACHE)
def evaluate_models(spec: FederationSpec, workspace: Path, models: dict[str, Path],
                    own: dict[str, dict[str, Path]] | None = None) -> dict[str, dict[str, float]]:
    """Every model scored on every site's held-out test cases, at the site; returns {site: {model: score}}.

    ``own`` holds models a site evaluates for itself only (its personalised model; its local-only model
    under ``local_baselines: own_site``), {site: {name: path}}."""
    with Supervisor() as sup:
        jobs = []
        for s in spec.sites:
            folder = workspace / "sites" / s.name
            (folder / "models").mkdir(exist_ok=True)
            args = [*SITEKIT, "evaluate", "--workspace", ".", "--out", "evaluation.json"]
            for name, path in {**models, **(own or {}).get(s.name, {})}.items():
                dst = folder / "models" / f"{name}.pt"
                if path.resolve() != dst.resolve():
                    shutil.copyfile(path, dst)
                args += ["--model", f"{name}=models/{name}.pt"]
            jobs.append(sup.start(s.name, "site-job", args, folder, env={"FEDWARD_TORCH_THREADS": "1"}))
        sup.wait_all(jobs, timeout=spec.timeouts.round_seconds, what="evaluation")
    return {s.name: json.loads((workspace / "sites" / s.name / "evaluation.json").read_text())["scores"] for s in spec.sites}


@task(name="personalise-at-each-site", cache_policy=NO_CACHE)
def personalise(spec: FederationSpec, workspace: Path, global_path: Path) -> dict[str, dict[str, Path]]:
    """Each site fine-tunes the global model on its own data; the result stays at (and is scored by) that site."""
    with Supervisor() as sup:
        jobs = []
        for s in spec.sites:
            folder = workspace / "sites" / s.name
            (folder / "models").mkdir(exist_ok=True)
            shutil.copyfile(global_path, folder / "models" / "global.pt")
            jobs.append(sup.start(s.name, "site-job", [*SITEKIT, "personalise", "--workspace", ".", "--model", "models/global.pt",
                                                       "--epochs", str(spec.personalise_epochs)], folder,
                                  env={"FEDWARD_TORCH_THREADS": "1"}))
        sup.wait_all(jobs, timeout=spec.timeouts.round_seconds, what="personalisation")
    return {s.name: {"personalised": workspace / "sites" / s.name / "personalised" / "model.pt"} for s in spec.sites}


@task(name="train-pooled-baseline-simulation-only", cache_policy=NO_CACHE)
def train_pooled(spec: FederationSpec, workspace: Path) -> Path:
    """SIMULATION ONLY — impossible in production: all sites' training data in one process.

    The upper reference a federation is compared with, trained with the federation's total
    budget (the sum of the sites' local steps)."""
    import torch

    from sitekit.engine.openfl_adapter import site_settings
    from sitekit.tasks import get_task
    from sitekit.training import make_loader, make_optimizer, train_round

    task = get_task(spec.task)
    sets = [task.dataset(s.name, s.data, "train") for s in spec.sites]
    steps = sum(json.loads((workspace / "sites" / s.name / "local" / "training.json").read_text())["steps"] for s in spec.sites)
    pooled = torch.utils.data.ConcatDataset(sets)
    model = task.build_model(seed=spec.seed)
    settings = site_settings(workspace / "sites" / spec.sites[0].name)

    def loaders():
        k = 0
        while True:
            k += 1
            yield make_loader(pooled, settings["batch_size"], shuffle=True, seed=spec.seed * 100003 + k)

    per_round = max(1, steps // spec.rounds)
    it = loaders()
    for r in range(spec.rounds):
        res = train_round(model, it, make_optimizer(model, spec.learning_rate), task.loss(), steps=per_round)
        print(f"pooled baseline (simulation only): block {r + 1}/{spec.rounds}, loss {res.loss:.4f}", flush=True)
    out = workspace / "models" / "pooled.pt"
    torch.save(model.state_dict(), out)
    return out


def comparison_table(spec: FederationSpec, scores: dict[str, dict[str, float]]) -> dict[str, dict]:
    table = {}
    for site in spec.site_names:
        s = scores[site]
        locals_ = {k[len("local-"):]: v for k, v in s.items() if k.startswith("local-")}
        best_model = max(locals_, key=locals_.get)
        table[site] = {
            "local": s[f"local-{site}"], "global": s["global"],
            "best_single_site": locals_[best_model], "best_single_site_model": best_model,
            "global_beats_best_single_site": bool(s["global"] >= locals_[best_model]),
        }
    return table


def format_table(table: dict[str, dict], metric: str = "dice") -> str:
    m = {"dice": "Dice", "accuracy": "acc."}.get(metric, metric)
    lines = [f"site          local-only {m:<5}  global {m:<5}  best single-site (model)     global >= best single site?"]
    for site, r in table.items():
        lines.append(f"{site:<13} {r['local']:>15.4f} {r['global']:>13.4f}   {r['best_single_site']:.4f} ({r['best_single_site_model']:<12}) "
                     f"  {'yes' if r['global_beats_best_single_site'] else 'NO'}")
    return "\n".join(lines)


def _print_table(table: dict[str, dict], metric: str, rows: list[dict], decision) -> None:
    # Written straight to stdout (not through Prefect's log prefixes) so the columns line up;
    # the Prefect UI gets the full table (every model at every site) as a markdown artifact.
    extra = ""
    if any(r.get("personalised") is not None or r.get("pooled") is not None for r in rows):
        extra = "\n".join(f"{r['site']:<13} personalised {r['personalised'] if r['personalised'] is None else format(r['personalised'], '.4f')}"
                          f"   pooled (simulation only) {r['pooled'] if r['pooled'] is None else format(r['pooled'], '.4f')}"
                          for r in rows) + "\n"
    sys.stdout.write("\n" + format_table(table, metric) + "\n" + extra +
                     f"promotion gate ({decision.rule}, {decision.candidate}): {'PASSED' if decision.passed else 'REFUSED'} - {decision.reason}\n\n")
    sys.stdout.flush()
    from prefect.artifacts import create_markdown_artifact

    create_markdown_artifact(key="site-comparison", description=f"{metric} per site: every model, and the promotion gate",
                             markdown=gating.table_markdown(rows, decision))


@task(name="register-global-model", cache_policy=NO_CACHE)
def register_global_model(spec: FederationSpec, state_dict_path: Path, decision=None, exploration: str | None = None) -> dict:
    """Every run's global model becomes a model version (for review and audit); only a model that
    passed the promotion gate, in a run that is not an exploration, gets the ``candidate`` alias.
    The version carries the gate's decision."""
    import monai
    import torch

    from sitekit.tasks import get_task

    model = get_task(spec.task).build_model(seed=spec.seed)
    state = model.state_dict()
    state.update(torch.load(state_dict_path, map_location="cpu", weights_only=True))
    model.load_state_dict(state)
    model.eval()
    if spec.task.kind == "tabular":
        from sitekit.tabular import N_FEATURES

        example = torch.zeros((1, N_FEATURES)).numpy()
    else:  # images: segmentation volumes (3D) and classification images (2D)
        example = torch.zeros((1, 1, *spec.task.input_size)).numpy()
    # "pickle" keeps the MONAI UNet an ordinary nn.Module (eval(), fine-tuning, any batch size);
    # MLflow's default "pt2" export would freeze it to the example's shape.
    info = mlflow.pytorch.log_model(
        model, name="global-model", registered_model_name=spec.name, input_example=example,
        serialization_format="pickle",
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"monai=={monai.__version__}", "nibabel"],
    )
    version = str(info.registered_model_version)
    if decision is not None:
        client = mlflow.MlflowClient()
        client.set_model_version_tag(spec.name, version, "fedward.gate", "passed" if decision.passed else "refused")
        client.set_model_version_tag(spec.name, version, "fedward.gate.reason", decision.reason[:4900])
        client.set_model_version_tag(spec.name, version, "fedward.algorithm", spec.algorithm)
        if decision.passed and exploration:
            print(f"promotion gate passed: version {version} stays without an alias ({exploration})")
        elif decision.passed:
            client.set_registered_model_alias(spec.name, "candidate", version)
            print(f"promotion gate passed: version {version} is now '{spec.name}@candidate'")
        else:
            print(f"promotion gate refused version {version}: {decision.reason}")
    return {"name": spec.name, "version": version, "model_uri": info.model_uri,
            "candidate": bool(decision.passed and not exploration) if decision is not None else None}


@task(name="review-and-promote", cache_policy=NO_CACHE)
def review_and_promote(spec: FederationSpec, workspace: Path, run_id: str, registered: dict, global_path: Path,
                       scores: dict, summaries: dict, decision, champion, audit, privacy: dict | None = None,
                       exploration: str | None = None):
    """Champion or challenger; then the audit trail, the model card and tags, and the DPIA annex."""
    from flows import dpia, model_card

    version = registered["version"]
    audit.append("model_registered", name=spec.name, version=version, model_sha256=compliance.file_sha256(global_path),
                 run_id=run_id, gate="passed" if decision.passed else "refused")
    n_test = {n: s["test_cases"] for n, s in summaries.items()}
    promoted = (promotion.not_a_candidate(champion, exploration) if exploration
                else promotion.decide(scores, n_test, decision, champion, rule=spec.gate))
    promotion.apply(spec, version, promoted)
    audit.append("promotion", name=spec.name, version=version, alias=promoted.alias, reason=promoted.reason,
                 champion_before=promoted.champion_version)
    records = audit.records()
    per_round = {site: max(r.values()) for site, r in dpia.measured_bytes(records).items()}
    plan_hash = engine.plan_hash(workspace / "aggregator")
    cases = {n: {"train": s["train_cases"], "test": s["test_cases"]} for n, s in summaries.items()}
    head = audit.head()
    card = model_card.markdown(spec, version=version, run_id=run_id, cases=cases, scores=scores, gate=decision,
                               promotion=promoted, audit_head=head, audit_records=len(records), plan_hash=plan_hash,
                               spec_sha256=compliance.file_sha256(spec.path), bytes_per_round=per_round, engine=engine.ENGINE,
                               privacy=privacy)
    model_card.publish(spec, version, card, model_card.tags(
        spec, run_id=run_id, cases=cases, global_scores={s: scores[s]["global"] for s in spec.site_names}, gate=decision,
        promotion=promoted, audit_head=head, plan_hash=plan_hash, task_signature=promotion.task_signature(spec),
        privacy=privacy))
    annex = dpia.annex_markdown(spec, audit_records=records, plan_hash=plan_hash, privacy=privacy)
    for path in dpia.write_annex(annex, workspace / "dpia" / "annex.md"):
        mlflow.log_artifact(str(path), "dpia")
    return promoted


# --------------------------------------------------------------------------- the flow

@flow(name="federated-training", log_prints=True)
def federated_training(spec_path: str, summary_path: str | None = None, workdir: str | None = None,
                       parent_run_id: str | None = None, exploration: str | None = None) -> dict:
    """Train one federation end to end; return (and optionally write) the per-site summary.

    ``parent_run_id``: log as a child of that MLflow run (the privacy sweep's levels).
    ``exploration``: why this run is not a candidate for promotion (a sweep level): its model is
    registered with its card and tags but no alias moves."""
    t0 = time.time()  # wall clock: compared with the participants' event times
    spec = validate_spec(spec_path)
    compliance.check_governance(spec)  # no site process touches data without a lawful basis on record
    summaries = check_site_data(spec)
    if spec.task.kind == "tabular" and spec.task.standardise == "federated":
        spec = federated_statistics(spec, summaries)
    privacy_plan = privacy_flow.check_budget(spec, summaries) if spec.privacy is not None else None
    check_port_free(spec)
    work = Path(workdir) if workdir else tracking.fedward_home() / "runs"
    tracking.configure(f"fedward/{spec.name}")
    workspace = build_workspace(spec, work)
    compliance.record_plans_shipped(spec, workspace)
    print(f"workspace {workspace}: plan hash {engine.plan_hash(workspace / 'aggregator')[:16]}..., "
          f"{len(spec.sites)} site certificates signed by the federation CA")
    with mlflow.start_run(run_name=f"{spec.name} {dt.datetime.now():%Y-%m-%d %H:%M}", nested=parent_run_id is not None,
                          parent_run_id=parent_run_id) as run, compliance.sealed_audit_log(workspace) as audit:
        mlflow.set_tags({"fedward.federation": spec.name, "fedward.engine": engine.ENGINE,
                         "fedward.workspace": str(workspace), "fedward.algorithm": spec.algorithm})
        mlflow.log_params({
            "federation": spec.name, "algorithm": spec.algorithm, "rounds": spec.rounds,
            "local_epochs": spec.local_epochs, "batch_size": spec.batch_size, "learning_rate": spec.learning_rate,
            "sites": ",".join(spec.site_names), "n_sites": len(spec.sites), "tls": spec.tls, "seed": spec.seed,
            "task": spec.task.kind, "metric": spec.task.metric,
            "model": spec.task.model.name, "loss": spec.task.loss,
            **({"channels": ",".join(map(str, spec.task.model.channels)), "norm": spec.task.model.norm,
                "input_size": "x".join(map(str, spec.task.input_size))} if spec.task.kind == "segmentation" else
               {"dataset": spec.task.dataset, "standardise": spec.task.standardise}),
            "local_steps": spec.local_steps, "personalise_epochs": spec.personalise_epochs, "gate": spec.gate,
            "simulation": spec.simulation,
            **{f"algorithm.{k}": v for k, v in spec.algorithm_params.items()},
            "plan_hash": engine.plan_hash(workspace / "aggregator"),
            **{f"train_cases.{n}": s["train_cases"] for n, s in summaries.items()},
            **{f"test_cases.{n}": s["test_cases"] for n, s in summaries.items()},
            **(privacy_flow.mlflow_params(spec, privacy_plan) if privacy_plan else {}),
        })
        mlflow.log_artifact(str(spec.path), "federation")
        if spec.task.feature_stats is not None:  # a user of the registered model needs its input scale
            from sitekit.tabular import FEATURE_NAMES

            mlflow.log_dict({"features": list(FEATURE_NAMES), "mean": list(spec.task.feature_stats[0]),
                             "std": list(spec.task.feature_stats[1])}, "federation/feature_standardisation.json")
        mlflow.log_artifact(str(workspace / "aggregator" / engine.PLAN), "openfl-plan")
        mlflow.log_artifact(str(workspace / "aggregator" / engine.COLS), "openfl-plan")
        print(f"MLflow run {run.info.run_id} at {mlflow.get_tracking_uri()}")

        result = run_rounds(spec, workspace, t0)
        rounds_done = result["rounds_completed"]  # fewer than planned only when the privacy budget ended the run
        state, last_round = engine.read_global_model(workspace / "aggregator")
        if last_round != rounds_done or (rounds_done != spec.rounds and not result["privacy_stop"]):
            raise FederationFailed("aggregator", f"final model is from round {last_round}, expected {spec.rounds}")
        privacy_summary = privacy_flow.final(spec, result, privacy_plan) if privacy_plan else None
        if privacy_summary:
            privacy_flow.log_final(privacy_summary)
        import torch

        global_path = workspace / "models" / "global.pt"
        global_path.parent.mkdir(exist_ok=True)
        torch.save(state, global_path)
        audit.append("federation_finished", rounds=last_round, model_sha256=compliance.file_sha256(global_path))
        print("federation finished; training local-only baselines with the same budget ...")
        local_paths = train_local_baselines(spec, workspace, rounds_done)
        models = {"global": global_path}
        if spec.simulation:
            models["pooled"] = train_pooled(spec, workspace)
        own = personalise(spec, workspace, global_path) if spec.personalise_epochs else {}
        if spec.local_baselines == "cross_site":  # each site's local-only model is scored at every site
            models.update({f"local-{k}": v for k, v in local_paths.items()})
            for k, v in local_paths.items():
                audit.append("local_model_shared", site=k, to_sites=[s for s in spec.site_names if s != k],
                             bytes=v.stat().st_size, model_sha256=compliance.file_sha256(v))
        else:  # own_site: it never leaves its site, which scores it on its own test cases only
            for k, v in local_paths.items():
                own.setdefault(k, {})[f"local-{k}"] = v
        champion = (promotion.fetch_champion(spec, workspace) if not exploration
                    else promotion.Champion(None, None, "not compared: " + exploration))
        if champion.path is not None:  # the current champion, scored at every site beside the new model
            models["champion"] = champion.path
        scores = evaluate_models(spec, workspace, models, own)
        metric = spec.task.metric
        table = comparison_table(spec, scores)
        n_test = {n: s["test_cases"] for n, s in summaries.items()}
        rows = gating.comparison_rows(scores, n_test, spec.local_baselines)
        decision = gating.decide(scores, n_test, rule=spec.gate, local_baselines=spec.local_baselines,
                                 candidate="personalised" if spec.personalise_epochs else "global")
        _print_table(table, metric, rows, decision)
        for site, r in table.items():
            mlflow.log_metrics({f"final/{site}/global_{metric}": r["global"], f"final/{site}/local_only_{metric}": r["local"],
                                f"final/{site}/best_single_site_{metric}": r["best_single_site"]})
            for extra in ("personalised", "pooled"):
                if extra in scores[site]:
                    mlflow.log_metric(f"final/{site}/{extra}_{metric}", scores[site][extra])
            # the curve's last point: the registered model, after all rounds
            mlflow.log_metric(f"site/{site}/global_model_{metric}", r["global"], step=rounds_done)
        mlflow.log_metric(f"federation/global_model_{metric}",
                          sum(table[n]["global"] * n_test[n] for n in table) / sum(n_test.values()), step=rounds_done)
        mlflow.log_dict({"scores": scores, "table": table, "rows": rows}, "comparison/scores.json")
        mlflow.log_text(gating.table_csv(rows), "comparison/sites.csv")
        mlflow.log_figure(gating.table_figure(rows, metric, decision), "comparison/sites.png")
        mlflow.log_text(gating.table_markdown(rows, decision), "comparison/sites.md")
        mlflow.set_tags({"fedward.gate": "passed" if decision.passed else "refused", "fedward.gate.rule": decision.rule,
                         "fedward.gate.candidate": decision.candidate, "fedward.gate.reason": decision.reason[:4900]})
        if result["history"]:
            mlflow.log_figure(tracking.curves_figure(result["history"], {s: r["global"] for s, r in table.items()}, metric),
                              "curves/learning_curves.png")
        mlflow.log_dict(result, "curves/rounds.json")
        registered = register_global_model(spec, global_path, decision, exploration)
        if privacy_summary:
            privacy_flow.tag_model_version(registered["name"], registered["version"], privacy_summary)
        promoted = review_and_promote(spec, workspace, run.info.run_id, registered, global_path, scores, summaries,
                                      decision, champion, audit, privacy_summary, exploration)
        wall = time.time() - t0
        mlflow.log_metric("wall_seconds", wall)
        summary = {
            "metric": metric, "sites": table, "rounds": rounds_done, "planned_rounds": spec.rounds,
            "algorithm": spec.algorithm, "privacy": privacy_summary,
            "gate": {"passed": decision.passed, "rule": decision.rule, "candidate": decision.candidate,
                     "reason": decision.reason, "margins": decision.margins},
            "scores": scores, "wall_seconds": round(wall, 1),
            "promotion": {"alias": promoted.alias, "reason": promoted.reason, "champion_before": promoted.champion_version,
                          "margins": promoted.margins},
            "audit_log": {"path": str(audit.path), "head": audit.head()},
            "mlflow_run_id": run.info.run_id, "registered_model": {"name": registered["name"], "version": registered["version"]},
            "timing": result["timing"], "round_history": result["history"], "workspace": str(workspace),
        }
        mlflow.log_dict(summary, "summary.json")
    if summary_path:
        out = Path(summary_path)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(summary, indent=2))
        os.replace(tmp, out)
    print(f"registered model '{registered['name']}' version {registered['version']}; {wall:.0f} s in all")
    return summary


USER_ERRORS = (SpecError, DataError, PortInUse, FederationFailed, pki.PKIError, privacy_flow.PrivacyBudgetError,
               GovernanceError)


class _OneSentenceForUserErrors(logging.Filter):
    """Prefect logs a failed task or flow with the Python traceback. For a user error (a bad spec,
    a site's broken data, a missing agreement ...) the message already is the one sentence that
    says what to fix; the traceback only buries it, so it is dropped. Other exceptions keep theirs."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], USER_ERRORS):
            record.exc_info, record.exc_text = None, None
        return True


for _name in ("prefect.task_runs", "prefect.flow_runs"):
    logging.getLogger(_name).addFilter(_OneSentenceForUserErrors())
