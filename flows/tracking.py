"""MLflow: where a federation's parameters, curves, comparison tables and models end up.

Default store: a local sqlite file under ``.fedward/`` (``MLFLOW_TRACKING_URI`` overrides it,
e.g. ``http://127.0.0.1:5000`` for an ``mlflow server``).
"""
from __future__ import annotations

import csv
import io
import os
from pathlib import Path

import mlflow

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def fedward_home() -> Path:
    return Path(os.environ.get("FEDWARD_HOME", ".fedward")).resolve()


def configure(experiment: str) -> str:
    """Point MLflow at the configured store and experiment; return the tracking URI."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    home = fedward_home()
    if not uri:
        home.mkdir(parents=True, exist_ok=True)
        uri = f"sqlite:///{home / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    if mlflow.get_experiment_by_name(experiment) is None:
        artifact_location = None
        if uri.startswith("sqlite:"):
            artifact_location = (home / "mlartifacts").as_uri()
        try:
            mlflow.create_experiment(experiment, artifact_location=artifact_location)
        except mlflow.exceptions.MlflowException:
            pass  # created concurrently
    mlflow.set_experiment(experiment)
    return uri


def log_round(round_number: int, federation: dict[str, float], sites: dict[str, dict[str, float]]) -> None:
    """One round's aggregated and per-site metrics, as steps so the UI draws curves."""
    metrics = {f"federation/{_clean(k)}": v for k, v in federation.items()}
    for site, values in sites.items():
        metrics.update({f"site/{site}/{_clean(k)}": v for k, v in values.items()})
    if metrics:
        mlflow.log_metrics(metrics, step=round_number)


def _clean(name: str) -> str:
    # "aggregated_model_validation/dice" -> "global_model_dice", etc.
    return (name.replace("aggregated_model_validation/", "global_model_")
                .replace("locally_tuned_model_validation/", "after_local_training_")
                .replace("train/", ""))


def comparison_csv(table: dict[str, dict]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["site", "local_only_dice", "global_dice", "best_single_site_dice", "best_single_site_model", "global_beats_best_single_site"])
    for site, row in table.items():
        w.writerow([site, f"{row['local']:.4f}", f"{row['global']:.4f}", f"{row['best_single_site']:.4f}",
                    row["best_single_site_model"], row["global_beats_best_single_site"]])
    return buf.getvalue()


def curves_figure(history: list[dict]):
    """Learning curves: global-model Dice per site per round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    sites = sorted({s for h in history for s in h["sites"]})
    for site in sites:
        xs = [h["round"] for h in history if site in h["sites"]]
        axes[0].plot(xs, [h["sites"][site].get("aggregated_model_validation/dice", float("nan")) for h in history if site in h["sites"]], marker="o", label=site)
        axes[1].plot(xs, [h["sites"][site].get("train/train_loss", float("nan")) for h in history if site in h["sites"]], marker="o", label=site)
    axes[0].set(title="Global model Dice on each site's test cases\n(model entering the round)", xlabel="round", ylabel="Dice")
    axes[1].set(title="Local training loss", xlabel="round", ylabel="loss")
    for ax in axes:
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def comparison_figure(table: dict[str, dict]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sites = list(table)
    fig, ax = plt.subplots(figsize=(2 + 2 * len(sites), 4))
    width = 0.27
    for i, (key, label) in enumerate([("local", "local-only (own site)"), ("best_single_site", "best single-site model"), ("global", "global (federated)")]):
        ax.bar([x + (i - 1) * width for x in range(len(sites))], [table[s][key] for s in sites], width, label=label)
    ax.set_xticks(range(len(sites)), sites)
    ax.set_ylim(0, 1)
    ax.set_ylabel("Dice on the site's held-out test cases")
    ax.legend(loc="lower right")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig
