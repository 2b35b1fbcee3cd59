"""MLflow: where a federation's parameters, curves, comparison tables and models end up.

Default store: a local sqlite file under ``.fedward/`` (``MLFLOW_TRACKING_URI`` overrides it,
e.g. ``http://127.0.0.1:5000`` for an ``mlflow server``).
"""
from __future__ import annotations

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


def log_round(round_index: int, federation: dict[str, float], sites: dict[str, dict[str, float]]) -> None:
    """One round's aggregated and per-site metrics, as steps so the UI draws curves.

    The step is the number of rounds completed when the value describes the model: the global
    model validated at the start of round i (0-based) has seen i rounds (step i); training loss
    and the locally trained model of round i belong to step i + 1.
    """
    before, after = {}, {}
    for prefix, values in [("federation", federation), *((f"site/{s}", v) for s, v in sites.items())]:
        for k, v in values.items():
            (before if k.startswith("aggregated_model_validation/") else after)[f"{prefix}/{_clean(k)}"] = v
    if before:
        mlflow.log_metrics(before, step=round_index)
    if after:
        mlflow.log_metrics(after, step=round_index + 1)


def _clean(name: str) -> str:
    # "aggregated_model_validation/dice" -> "global_model_dice", etc.
    return (name.replace("aggregated_model_validation/", "global_model_")
                .replace("locally_tuned_model_validation/", "after_local_training_")
                .replace("train/", ""))


def curves_figure(history: list[dict], final: dict[str, float] | None = None, metric: str = "dice"):
    """Learning curves per site: the global model's metric after r rounds (r = 0 .. N), and training loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    sites = sorted({s for h in history for s in h["sites"]})
    for site in sites:
        rows = [h for h in history if site in h["sites"]]
        xs = [h["round"] for h in rows]
        ys = [h["sites"][site].get(f"aggregated_model_validation/{metric}", float("nan")) for h in rows]
        if final and site in final:
            xs, ys = xs + [len(history)], ys + [final[site]]
        axes[0].plot(xs, ys, marker="o", label=site)
        axes[1].plot([h["round"] + 1 for h in rows], [h["sites"][site].get("train/train_loss", float("nan")) for h in rows], marker="o", label=site)
    label = {"dice": "Dice", "accuracy": "accuracy"}.get(metric, metric)
    axes[0].set(title=f"Global model {label} on each site's test cases", xlabel="rounds completed", ylabel=label)
    axes[1].set(title="Local training loss during the round", xlabel="round", ylabel="loss")
    from matplotlib.ticker import MaxNLocator

    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig
