"""The model card: what a registered model version is and where it came from, for a reviewer in MLflow.

Each version gets the card as its description (the MLflow UI shows it on the version's page) and as
the run artifact ``model-card/MODEL_CARD.md``, and a set of ``fedward.*`` tags a reviewer can
search on: sites and case counts, algorithm and rounds, the metric at every site, ε and δ, the gate
result, the audit log's head hash, the plan hash and the container image digests.
"""
from __future__ import annotations

import datetime as dt
import json

from sitekit.governance import privacy_of, privacy_text
from sitekit.spec import FederationSpec

NONE_DP = "none"


def tags(spec: FederationSpec, *, run_id: str, cases: dict[str, dict], global_scores: dict[str, float],
         gate, promotion, audit_head: str, plan_hash: str, task_signature: dict,
         image_digests: dict[str, str] | None = None, privacy: dict | None = None) -> dict[str, str]:
    """The model version's ``fedward.*`` tags (all strings); ``privacy``: what the run spent (the flow's summary)."""
    p = privacy_of(spec, privacy)
    out = {
        "fedward.sites": ",".join(spec.site_names),
        "fedward.cases": json.dumps(cases, sort_keys=True),
        "fedward.algorithm": spec.algorithm,
        "fedward.rounds": str(spec.rounds),
        "fedward.metric": spec.task.metric,
        "fedward.epsilon": (f"{p['epsilon']:.4f}" if isinstance(p["epsilon"], float) else str(p["epsilon"])) if p else NONE_DP,
        "fedward.delta": (f"{p['delta']:.3g}" if isinstance(p["delta"], float) else str(p["delta"])) if p else NONE_DP,
        "fedward.gate": "passed" if gate.passed else "refused",
        "fedward.gate.rule": gate.rule,
        "fedward.promotion": promotion.alias,
        "fedward.audit.head": audit_head,
        "fedward.plan_hash": plan_hash,
        "fedward.run_id": run_id,
        "fedward.task": json.dumps(task_signature, sort_keys=True),
        "fedward.image_digests": json.dumps(image_digests, sort_keys=True) if image_digests else "none",
    }
    for site, score in global_scores.items():
        out[f"fedward.{spec.task.metric}.{site}"] = f"{score:.4f}"
    return out


def markdown(spec: FederationSpec, *, version: str, run_id: str, cases: dict[str, dict],
             scores: dict[str, dict[str, float]], gate, promotion, audit_head: str, audit_records: int,
             plan_hash: str, spec_sha256: str, bytes_per_round: dict[str, int], engine: str,
             image_digests: dict[str, str] | None = None, today: dt.date | None = None,
             privacy: dict | None = None) -> str:
    """The card, in Markdown; ``privacy``: what the run spent (the flow's privacy summary)."""
    m = spec.task.metric
    p = privacy_of(spec, privacy)
    t = spec.task
    what = (f"MONAI 3D UNet (channels {'-'.join(map(str, t.model.channels))}, strides {'-'.join(map(str, t.model.strides))}, "
            f"{t.model.res_units} residual unit(s), {t.model.norm} normalisation); input (N, 1, "
            f"{', '.join(map(str, t.input_size))}), {t.normalize}-normalised T1; output 2-channel logits (channel 1 = {t.label})"
            if t.kind == "segmentation" else
            f"logistic regression (one linear layer + sigmoid) on the {t.dataset} features, standardised "
            f"{'with one federated scale' if t.standardise == 'federated' else 'per site'}; output the probability of disease")
    total = sum(c["test"] for c in cases.values())
    weighted = sum(scores[s]["global"] * cases[s]["test"] for s in spec.site_names) / total
    lines = [
        f"# Model card: {spec.name}, version {version}",
        "",
        (f"**Status:** `@{promotion.alias}` - {promotion.reason}" if promotion.alias != "exploration"
         else f"**Status:** no alias - {promotion.reason}"),
        "",
        f"**Promotion gate ({gate.rule}): {'PASSED' if gate.passed else 'REFUSED'}** - {gate.reason}",
        "",
        "## What it is",
        f"- Task: {t.kind} ({t.dataset or 'images'}), metric {m}, loss {t.loss}",
        f"- Model: {what}",
        f"- Trained by federated learning: {spec.algorithm}"
        + (f" ({', '.join(f'{k}={v:g}' for k, v in spec.algorithm_params.items())})" if spec.algorithm_params else "")
        + f", {spec.rounds} rounds, "
        + (f"{spec.local_steps} local steps" if spec.local_steps else f"{spec.local_epochs} local epoch(s)")
        + f" per round, batch {spec.batch_size}, learning rate {spec.learning_rate:g}, seed {spec.seed}",
        f"- Engine: {engine}; mutual TLS {'on' if spec.tls else 'OFF'}",
        "",
        "## Sites, cases and scores",
        f"Scores are {m} on each site's held-out test cases, computed at the site.",
        "",
        f"| site | controller | training cases | test cases | this model | local-only model | champion before this run |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in spec.sites:
        g = s.governance
        sc = scores[s.name]
        champ = f"{sc['champion']:.4f}" if "champion" in sc else "-"
        lines.append(f"| {s.name} | {g.controller if g else '-'} | {cases[s.name]['train']} | {cases[s.name]['test']} | "
                     f"{sc['global']:.4f} | {sc.get(f'local-{s.name}', float('nan')):.4f} | {champ} |")
    lines += ["", f"Test-case-weighted mean {m}: {weighted:.4f} over {total} test cases.", "",
              "## Privacy",
              (f"- Differential privacy: {privacy_text(p)}" if p else "- Differential privacy: none (ε, δ not applicable): the shared updates are exact model weights"),
              "- What left each site per round (measured, from the audit log): "
              + (", ".join(f"{k} {v:,} bytes" for k, v in bytes_per_round.items()) or "nothing recorded"),
              "- Lawful basis per site: " + "; ".join(
                  f"{s.name}: {s.governance.lawful_basis_text()}" for s in spec.sites if s.governance),
              "",
              "## Intended use and limits",
              *[f"- {s.name}: {s.governance.data_use}" for s in spec.sites if s.governance and s.governance.data_use],
              "- Evaluated only on the participating sites' held-out test cases; performance elsewhere is unknown.",
              "- A research model, not a medical device: not for clinical decisions.",
              "",
              "## Provenance",
              f"- MLflow run: `{run_id}`",
              f"- Plan hash (OpenFL, identical at every participant): `{plan_hash}`",
              f"- Federation spec sha256: `{spec_sha256}`",
              f"- Audit log: {audit_records} records, head hash `{audit_head}` (artifact `audit/audit.jsonl`; "
              f"check with `fedward audit-log verify audit.jsonl --head {audit_head}`)",
              "- Container images: " + (", ".join(f"{k} `{v}`" for k, v in sorted(image_digests.items())) if image_digests
                                        else "none recorded (participants ran from the installed fedward package)"),
              f"- Card written {(today or dt.date.today()).isoformat()}",
              ""]
    return "\n".join(lines)


def publish(spec: FederationSpec, version: str, card: str, version_tags: dict[str, str]) -> None:
    """Card as the version's description and as a run artifact; tags on the version."""
    import mlflow

    client = mlflow.MlflowClient()
    client.update_model_version(spec.name, version, description=card[:60000])
    for k, v in version_tags.items():
        client.set_model_version_tag(spec.name, version, k, v[:4900])
    mlflow.log_text(card, "model-card/MODEL_CARD.md")
