"""Champion / challenger: a retrained model replaces ``<federation>@champion`` only if it is better.

Every run registers its global model as a new version. The version already aliased
``@champion`` is evaluated at every site, on the same held-out test cases and in the same
evaluation step as the new model (so both scores come from the sites, never from data that left
them). The new version becomes ``@champion`` only if

1. it passed the promotion gate (:mod:`flows.gate`: not worse than the best single-site model), and
2. it is better than the champion under the federation's gate rule:
   ``weighted_mean`` - its test-case-weighted mean over the sites is higher than the champion's;
   ``every_site`` - that, and it scores at least the champion's score on every site.

Otherwise it becomes ``@challenger``, and the reason (with the numbers) is printed, tagged on the
version (``fedward.promotion.reason``) and written to the audit log. With no champion yet, a
version that passes the gate becomes the first champion. A champion that is a different model
(another task or architecture) cannot be compared on scores: the new version becomes the
challenger and a person moves the alias after review.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
from prefect import task
from prefect.cache_policies import NO_CACHE

from flows.gate import GateDecision
from sitekit.spec import FederationSpec

CHAMPION, CHALLENGER = "champion", "challenger"
EXPLORATION = "exploration"  # a run that is not a candidate (a privacy-sweep level): tagged, never aliased
_EPS = 1e-9


@dataclass(frozen=True)
class Champion:
    version: str | None  # None: the registered model has no champion yet
    path: Path | None  # its weights for evaluation at the sites; None when it cannot be compared
    note: str


@dataclass(frozen=True)
class PromotionDecision:
    promote: bool
    alias: str  # CHAMPION or CHALLENGER
    reason: str
    champion_version: str | None
    margins: dict[str, float] = field(default_factory=dict)  # new - champion, per site and "weighted_mean"


def task_signature(spec: FederationSpec) -> dict:
    """What must match for two versions' scores to be comparable (not the training settings)."""
    t = spec.task
    return {"kind": t.kind, "dataset": t.dataset, "model": t.model.name, "channels": list(t.model.channels),
            "strides": list(t.model.strides), "res_units": t.model.res_units, "norm": t.model.norm,
            "input_size": list(t.input_size), "normalize": t.normalize, "label": t.label, "metric": t.metric}


@task(name="fetch-champion", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=5)
def fetch_champion(spec: FederationSpec, workspace: Path) -> Champion:
    """The current ``@champion``'s weights in the workspace, ready to be evaluated at every site."""
    import torch
    from mlflow.exceptions import MlflowException

    from sitekit.tasks import get_task

    client = mlflow.MlflowClient()
    try:
        mv = client.get_model_version_by_alias(spec.name, CHAMPION)
    except MlflowException:
        print(f"no '{spec.name}@{CHAMPION}' yet: this run's model becomes champion if it passes the promotion gate")
        return Champion(None, None, "no champion yet")
    tag = mv.tags.get("fedward.task")
    if tag and json.loads(tag) != task_signature(spec):
        note = f"version {mv.version} is a model for another task or architecture ({tag})"
        print(f"champion {note}: it cannot be compared on scores")
        return Champion(mv.version, None, note)
    model = mlflow.pytorch.load_model(f"models:/{spec.name}@{CHAMPION}", map_location="cpu")
    state = model.state_dict()
    ours = get_task(spec.task).build_model(seed=spec.seed).state_dict()
    different = sorted(k for k in ours if k not in state or tuple(state[k].shape) != tuple(ours[k].shape))
    if different:
        note = f"version {mv.version} has a different architecture (e.g. tensor {different[0]!r})"
        print(f"champion {note}: it cannot be compared on scores")
        return Champion(mv.version, None, note)
    out = Path(workspace) / "models" / "champion.pt"
    out.parent.mkdir(exist_ok=True)
    torch.save({k: v.detach().cpu() for k, v in state.items() if k in ours}, out)
    print(f"champion '{spec.name}@{CHAMPION}' is version {mv.version}: evaluating it at every site beside the new model")
    return Champion(mv.version, out, f"version {mv.version}")


def decide(scores: dict[str, dict[str, float]], test_cases: dict[str, int], gate: GateDecision, champion: Champion,
           rule: str = "weighted_mean", new: str = "global") -> PromotionDecision:
    """Promote the new model, or make it the challenger, and say why in one sentence with the numbers."""
    sites = list(test_cases)
    margins: dict[str, float] = {}
    comparison = ""
    better = None
    if champion.version is not None and champion.path is not None:
        missing = [s for s in sites if "champion" not in scores.get(s, {})]
        if missing:
            raise ValueError(f"the champion was not evaluated on site(s) {', '.join(map(repr, missing))}")
        total = sum(test_cases.values())
        mean_new = sum(scores[s][new] * test_cases[s] for s in sites) / total
        mean_champ = sum(scores[s]["champion"] * test_cases[s] for s in sites) / total
        margins = {s: scores[s][new] - scores[s]["champion"] for s in sites}
        margins["weighted_mean"] = mean_new - mean_champ
        worse = [s for s in sites if margins[s] < -_EPS]
        better = margins["weighted_mean"] > _EPS and (rule != "every_site" or not worse)
        op = ">" if margins["weighted_mean"] > _EPS else ("=" if abs(margins["weighted_mean"]) <= _EPS else "<")
        comparison = (f"weighted by test cases over {len(sites)} site(s) it scores {mean_new:.4f} {op} {mean_champ:.4f} "
                      f"for champion version {champion.version}")
        if worse:
            comparison += ", and it scores below the champion on site(s) " + ", ".join(
                f"{s!r} ({scores[s][new]:.4f} < {scores[s]['champion']:.4f})" for s in worse)
    if not gate.passed:
        reason = f"not promoted: the promotion gate refused it ({gate.reason})"
        if comparison:
            reason += f"; against the champion, {comparison}"
        return PromotionDecision(False, CHALLENGER, reason, champion.version, margins)
    if champion.version is None:
        return PromotionDecision(True, CHAMPION, "promoted: there was no champion yet and it passed the promotion gate",
                                 None, margins)
    if champion.path is None:
        return PromotionDecision(False, CHALLENGER, f"not promoted: the champion cannot be compared on scores "
                                 f"({champion.note}); review both and move the alias by hand", champion.version, margins)
    if better:
        return PromotionDecision(True, CHAMPION, f"promoted: it passed the promotion gate and {comparison}",
                                 champion.version, margins)
    rule_text = " (rule every_site: at least as good on every site and better overall)" if rule == "every_site" else ""
    return PromotionDecision(False, CHALLENGER, f"not promoted: it passed the promotion gate but is not better than the "
                             f"champion{rule_text}: {comparison}", champion.version, margins)


@task(name="promote-or-challenge", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=5)
def apply(spec: FederationSpec, version: str, decision: PromotionDecision) -> None:
    """Move ``@champion`` (or ``@challenger``) to the new version and tag it with the decision."""
    client = mlflow.MlflowClient()
    if decision.alias != EXPLORATION:
        client.set_registered_model_alias(spec.name, decision.alias, version)
    client.set_model_version_tag(spec.name, version, "fedward.promotion", decision.alias)
    client.set_model_version_tag(spec.name, version, "fedward.promotion.reason", decision.reason[:4900])
    if decision.champion_version is not None:
        client.set_model_version_tag(spec.name, version, "fedward.promotion.previous_champion", decision.champion_version)
    print(f"version {version} is now '{spec.name}@{decision.alias}': {decision.reason}" if decision.alias != EXPLORATION
          else f"version {version} of '{spec.name}' has no alias: {decision.reason}")


def not_a_candidate(champion: Champion, why: str) -> PromotionDecision:
    """The decision for a run that explores (a privacy-sweep level): registered and reviewed, never promoted."""
    return PromotionDecision(False, EXPLORATION, f"not considered for promotion: {why}", champion.version)
