"""Privacy in the control plane: the budget check before a run, what MLflow records, the model's tags.

The maths lives in :mod:`sitekit.privacy`; this module only asks it for each site's schedule
(from the aggregate case counts the sites reported) and writes down what was spent:

- parameters: mode, accountant, clip, noise multiplier (per site when derived), δ (per site
  when it defaults to 1/N), sampling rate and steps per round per site, target ε;
- metrics: ``privacy/epsilon`` (the federation's worst case) and ``privacy/<site>/epsilon`` at
  step = rounds completed, and ``final/privacy/epsilon`` (and per site);
- tags on the run and on the registered model version: ``fedward.privacy.epsilon``,
  ``fedward.privacy.delta``, ``fedward.privacy.mode``, and ``fedward.stop_reason`` when the
  budget ended the run early.
"""
from __future__ import annotations

import json
import math

import mlflow
from prefect import task
from prefect.cache_policies import NO_CACHE

from sitekit.privacy import federation_budget, site_budget
from sitekit.spec import FederationSpec


class PrivacyBudgetError(ValueError):
    """The spec's privacy settings cannot train even one round within the target."""


def budgets(spec: FederationSpec, summaries: dict[str, dict]) -> dict[str, "object"]:
    """Who spends privacy, and their schedule: each site (dp-sgd; client-dp with noise at the sites) or the aggregator."""
    p = spec.privacy
    if p.mode == "client-dp" and p.noise_at == "server":
        return {"aggregator": federation_budget(p, spec.rounds)}
    return {s: site_budget(p, summaries[s]["train_cases"], spec.batch_size, spec.local_epochs, spec.local_steps, spec.rounds)
            for s in spec.site_names}


@task(name="check-privacy-budget", cache_policy=NO_CACHE)
def check_budget(spec: FederationSpec, summaries: dict[str, dict]) -> dict:
    """Each spender's ε after every round; refuse a run whose first round already exceeds the target.

    Returns {"budgets": {who: Budget as dict}, "schedule": {who: [ε after round 1..]},
    "rounds_within_budget": the number of rounds the run is expected to complete}."""
    p = spec.privacy
    plan = budgets(spec, summaries)
    schedule = {who: b.schedule() if spec.rounds <= 200 else [] for who, b in plan.items()}
    within = min(b.rounds_within_budget() for b in plan.values())
    print(f"privacy: {p.mode}, {p.accountant.upper()} accountant, clip {p.clip:g}"
          + (f", noise at the {p.noise_at}" if p.mode == "client-dp" else "")
          + (f", target ε {p.target_epsilon:g}" if p.target_epsilon is not None else ""))
    for who, b in plan.items():
        eps = schedule[who]
        shown = " ".join(f"{e:.2f}" for e in eps[:12]) + (" ..." if len(eps) > 12 else "")
        print(f"  {who}: noise multiplier {b.noise_multiplier:.3f}{' (derived)' if b.noise_derived else ''}, "
              f"sample rate {b.sample_rate:.4f}, {b.steps_per_round} noisy step(s) per round, δ {b.delta:.3g}"
              f"{' (1/N)' if b.delta_default else ''}; ε after each round: {shown}")
    if p.target_epsilon is not None:
        first = {who: b.epsilon_after(1) for who, b in plan.items()}
        who = max(first, key=first.get)
        if first[who] > p.target_epsilon:
            where = "the aggregator's noise" if who == "aggregator" else f"site '{who}'"
            raise PrivacyBudgetError(
                f"{spec.path}: field 'privacy.target_epsilon' is {p.target_epsilon:g}, but one round at {where} already "
                f"spends ε = {first[who]:.2f} (δ = {plan[who].delta:.3g}); raise privacy.noise_multiplier, train less per "
                "round (local_epochs or local_steps), or raise the target.")
        if within < spec.rounds:
            print(f"  the privacy budget allows {within} of the {spec.rounds} rounds: the federation will stop after round "
                  f"{within} and register that model")
    return {"budgets": {who: b.to_dict() for who, b in plan.items()}, "schedule": schedule,
            "rounds_within_budget": within}


def mlflow_params(spec: FederationSpec, plan: dict) -> dict:
    p = spec.privacy
    out = {"privacy.mode": p.mode, "privacy.accountant": p.accountant, "privacy.noise_at": p.noise_at,
           "privacy.clip_norm" if p.mode == "client-dp" else "privacy.max_grad_norm": p.clip,
           "privacy.target_epsilon": p.target_epsilon, "privacy.noise_multiplier_given": p.noise_multiplier,
           "privacy.delta_given": p.delta}
    for who, b in plan["budgets"].items():
        out.update({f"privacy.noise_multiplier.{who}": round(b["noise_multiplier"], 6),
                    f"privacy.delta.{who}": b["delta"], f"privacy.sample_rate.{who}": round(b["sample_rate"], 6),
                    f"privacy.steps_per_round.{who}": b["steps_per_round"]})
    return out


def round_epsilon(spec: FederationSpec, entry: dict) -> dict[str, dict[str, float]]:
    """{who: {"epsilon", "delta"}} after this round, from the sites' reports or the aggregator's."""
    p = spec.privacy
    if p.mode == "client-dp" and p.noise_at == "server":
        s = entry.get("server", {})
        if "privacy_epsilon" not in s:
            return {}
        return {"aggregator": {"epsilon": s["privacy_epsilon"], "delta": s["privacy_delta"]}}
    return {site: {"epsilon": v["train/epsilon"], "delta": v["train/delta"]}
            for site, v in entry["sites"].items() if "train/epsilon" in v}


def log_round(spec: FederationSpec, entry: dict) -> None:
    """ε per spender and the federation's worst case, at step = rounds completed."""
    eps = round_epsilon(spec, entry)
    if not eps:
        return
    metrics = {f"privacy/{who}/epsilon": v["epsilon"] for who, v in eps.items()}
    metrics["privacy/epsilon"] = max(v["epsilon"] for v in eps.values())
    mlflow.log_metrics(metrics, step=entry["round"] + 1)


def final(spec: FederationSpec, result: dict, plan: dict) -> dict:
    """What the run spent: the worst case over spenders (each site's guarantee concerns its own records)."""
    last = round_epsilon(spec, result["history"][-1]) if result["history"] else {}
    for who, v in last.items():
        v["delta"] = plan["budgets"][who]["delta"]
    p = spec.privacy
    summary = {"mode": p.mode, "accountant": p.accountant, "noise_at": p.noise_at, "clip": p.clip,
               "target_epsilon": p.target_epsilon, "per_site": last,
               "epsilon": max((v["epsilon"] for v in last.values()), default=float("nan")),
               # δ from the schedule (the reported value went through float32)
               "delta": max((plan["budgets"][w]["delta"] for w in last), default=float("nan")),
               "noise_multiplier": {who: b["noise_multiplier"] for who, b in plan["budgets"].items()},
               "rounds_completed": result.get("rounds_completed", spec.rounds), "planned_rounds": spec.rounds,
               "stopped_for_budget": bool(result.get("privacy_stop"))}
    if result.get("privacy_stop"):
        summary["stop"] = result["privacy_stop"]
    return summary


def log_final(summary: dict) -> None:
    if math.isfinite(summary["epsilon"]):
        mlflow.log_metrics({"final/privacy/epsilon": summary["epsilon"],
                            **{f"final/privacy/{who}/epsilon": v["epsilon"] for who, v in summary["per_site"].items()}})
    mlflow.set_tags({"fedward.privacy.mode": summary["mode"], "fedward.privacy.epsilon": f"{summary['epsilon']:.4f}",
                     "fedward.privacy.delta": f"{summary['delta']:.3g}",
                     "fedward.privacy.budget_stop": str(summary["stopped_for_budget"]).lower()})
    if summary["stopped_for_budget"]:
        mlflow.set_tag("fedward.stop_reason", "privacy_budget")
    mlflow.log_dict(summary, "privacy/privacy.json")


def tag_model_version(name: str, version: str, summary: dict) -> None:
    """The registered model carries the guarantee it was trained under."""
    client = mlflow.MlflowClient()
    client.set_model_version_tag(name, version, "fedward.privacy.mode", summary["mode"])
    client.set_model_version_tag(name, version, "fedward.privacy.epsilon", f"{summary['epsilon']:.4f}")
    client.set_model_version_tag(name, version, "fedward.privacy.delta", f"{summary['delta']:.3g}")
    client.set_model_version_tag(name, version, "fedward.privacy.per_site", json.dumps(
        {k: {"epsilon": round(v["epsilon"], 4), "delta": v["delta"]} for k, v in summary["per_site"].items()}))
    if summary["stopped_for_budget"]:
        client.set_model_version_tag(name, version, "fedward.stop_reason", "privacy_budget")


def stop_message(stop: dict) -> str:
    who = "the aggregator's noise" if stop["by"] == "aggregator" else f"site '{stop['by']}'"
    return (f"privacy budget: stopping after round {stop['rounds_completed']} of {stop['planned_rounds']}: round "
            f"{stop['rounds_completed'] + 1} would take {who} to ε = {stop['epsilon_next']:.3f}, beyond the target "
            f"{stop['target_epsilon']:g}; the model of round {stop['rounds_completed']} (within budget) is registered")
