"""The ``privacy-sweep`` flow: the same federation at several noise levels, ε against the task metric.

validate spec -> one MLflow parent run -> for each noise multiplier, the ``federated-training``
flow as a child run (0 = the same federation without privacy) -> a table, a CSV and a plot of
ε versus the global model's metric, logged as artifacts of the parent run.

Every level trains all the spec's rounds: the sweep maps the curve, so ``target_epsilon`` is
left out of the levels (the plot marks it). Each level's ε is its worst site's (dp-sgd) or the
federation's (client-dp) at the spec's δ; the metric is the global model's, weighted by each
site's test cases.
"""
from __future__ import annotations

import copy
import csv
import datetime as dt
import io
import json
import math
import os
import socket
import sys
from pathlib import Path

os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

import mlflow  # noqa: E402
import yaml  # noqa: E402
from prefect import flow, task  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402

from flows import tracking  # noqa: E402
from flows.federated_training import federated_training  # noqa: E402
from sitekit.spec import FederationSpec, SpecError, load_spec  # noqa: E402

DEFAULT_PRIVACY = {"mode": "dp-sgd", "max_grad_norm": 1.0}  # when the spec has no privacy section


def parse_noise_levels(text: str) -> list[float]:
    """``"0,0.5,1,2"`` -> [0.0, 0.5, 1.0, 2.0]; 0 means without privacy."""
    try:
        levels = [float(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise SpecError(f"--noise must be comma-separated numbers such as 0,0.5,1,2, got {text!r}.") from None
    if not levels or any(not math.isfinite(v) or v < 0 or v > 100 for v in levels):
        raise SpecError(f"--noise must be numbers between 0 (no privacy) and 100, got {text!r}.")
    if len(set(levels)) != len(levels):
        raise SpecError(f"--noise repeats a level: {text!r}.")
    return levels


def _port(preferred: int) -> int:
    """The spec's port if it is free now, else any free loopback port (the last level's may be in TIME_WAIT)."""
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", preferred))
            return preferred
        except OSError:
            pass
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@task(name="write-level-spec", cache_policy=NO_CACHE)
def level_spec(spec: FederationSpec, raw: dict, noise: float, folder: Path) -> Path:
    """The spec at one noise level: same everything (governance records included; local-only models
    scored at their own site only, with or without DP), site paths made absolute, target ε left out."""
    out = copy.deepcopy(raw)
    out["sites"] = [{**r, "data": str(s.data)} for r, s in zip(raw["sites"], spec.sites)]
    out["aggregator"] = {**(raw.get("aggregator") or {}), "port": _port(spec.aggregator.port)}
    if noise == 0:
        out.pop("privacy", None)
        # the sweep is of a DP federation: its sites never agreed to share their (non-private) local-only
        # models, so the level without DP keeps them at home as every DP level does
        out.setdefault("local_baselines", "own_site")
    else:
        privacy = dict(raw.get("privacy") or DEFAULT_PRIVACY)
        privacy.pop("target_epsilon", None)
        privacy["noise_multiplier"] = noise
        out["privacy"] = privacy
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"noise-{noise:g}.yaml"
    path.write_text(yaml.safe_dump(out, sort_keys=False))
    return path


def _row(noise: float, summary: dict, metric: str) -> dict:
    run = mlflow.MlflowClient().get_run(summary["mlflow_run_id"])
    value = run.data.metrics[f"federation/global_model_{metric}"]  # last step: the registered model, case-weighted
    p = summary.get("privacy")
    return {"noise_multiplier": noise, "epsilon": p["epsilon"] if p else math.inf, "delta": p["delta"] if p else None,
            metric: value, **{f"{metric}.{s}": r["global"] for s, r in summary["sites"].items()},
            "rounds": summary["rounds"], "mlflow_run_id": summary["mlflow_run_id"],
            "registered_version": summary["registered_model"]["version"]}


def _jsonable(v):
    """inf (no privacy) as the string "inf": JSON has no infinity."""
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_jsonable(x) for x in v]
    if isinstance(v, float) and math.isinf(v):
        return "inf"
    return v


def table_text(rows: list[dict], metric: str) -> str:
    sites = [k.split(".", 1)[1] for k in rows[0] if k.startswith(f"{metric}.")]
    head = f"{'noise':>6}  {'epsilon':>8}  {'delta':>8}  {metric + ' (weighted)':>15}  " + "  ".join(f"{s:>11}" for s in sites)
    lines = [head]
    for r in rows:
        eps = "inf" if math.isinf(r["epsilon"]) else f"{r['epsilon']:.2f}"
        delta = "-" if r["delta"] is None else f"{r['delta']:.0e}"
        lines.append(f"{r['noise_multiplier']:>6g}  {eps:>8}  {delta:>8}  {r[metric]:>15.4f}  "
                     + "  ".join(f"{r[f'{metric}.{s}']:>11.4f}" for s in sites))
    return "\n".join(lines)


def table_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    for r in rows:
        w.writerow({k: ("inf" if isinstance(v, float) and math.isinf(v) else v) for k, v in r.items()})
    return buf.getvalue()


def curve_figure(rows: list[dict], metric: str, target: float | None, name: str):
    """ε (log scale) against the metric; the non-private run as a dashed line."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 4.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    private = sorted((r for r in rows if not math.isinf(r["epsilon"])), key=lambda r: r["epsilon"])
    if private:
        ax.plot([r["epsilon"] for r in private], [r[metric] for r in private], marker="o", label="with DP")
        for r in private:
            ax.annotate(f"z={r['noise_multiplier']:g}", (r["epsilon"], r[metric]), textcoords="offset points",
                        xytext=(4, -12), fontsize=8)
        ax.set_xscale("log")
    for r in rows:
        if math.isinf(r["epsilon"]):
            ax.axhline(r[metric], color="grey", linestyle="--", label=f"without DP ({r[metric]:.3f})")
    if target is not None:
        ax.axvline(target, color="tab:red", linestyle=":", label=f"target ε = {target:g}")
    ax.set(xlabel="ε (worst site, at the spec's δ)", ylabel=f"global model {metric.upper()} (test, case-weighted)",
           title=f"{name}: privacy against utility")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


@flow(name="privacy-sweep", log_prints=True)
def privacy_sweep(spec_path: str, noise_levels: list[float], workdir: str | None = None,
                  summary_path: str | None = None) -> dict:
    """Run the federation once per noise level (children of one MLflow run); return the table."""
    spec = load_spec(spec_path)
    raw = yaml.safe_load(Path(spec_path).read_text())
    if spec.privacy is None:
        print(f"{spec.path} has no privacy section: the private levels use dp-sgd with max_grad_norm 1.0 and δ = 1/N")
    metric = spec.task.metric
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    work = Path(workdir) if workdir else tracking.fedward_home() / "runs"
    folder = work / f"{spec.name}-sweep-{stamp}"
    tracking.configure(f"fedward/{spec.name}")
    rows: list[dict] = []
    with mlflow.start_run(run_name=f"{spec.name} privacy sweep {dt.datetime.now():%Y-%m-%d %H:%M}") as parent:
        p = spec.privacy
        mlflow.set_tags({"fedward.federation": spec.name, "fedward.kind": "privacy-sweep"})
        mlflow.log_params({"noise_levels": ",".join(f"{z:g}" for z in noise_levels), "rounds": spec.rounds,
                           "privacy.mode": p.mode if p else "dp-sgd", "privacy.clip": p.clip if p else 1.0,
                           "privacy.delta": p.delta if p else "1/N", "privacy.accountant": p.accountant if p else "rdp",
                           "privacy.target_epsilon": p.target_epsilon if p else None, "metric": metric})
        mlflow.log_artifact(str(spec.path), "federation")
        for i, noise in enumerate(noise_levels):
            print(f"privacy sweep: level {i + 1}/{len(noise_levels)}: noise multiplier {noise:g}"
                  f"{' (without privacy)' if noise == 0 else ''}", flush=True)
            path = level_spec(spec, raw, noise, folder)
            summary = federated_training(str(path), workdir=str(work), parent_run_id=parent.info.run_id,
                                         exploration=f"privacy-sweep level, noise multiplier {noise:g}")
            rows.append(_row(noise, summary, metric))
            r = rows[-1]
            mlflow.log_metrics({f"sweep/{metric}": r[metric], "sweep/noise_multiplier": noise,
                                **({"sweep/epsilon": r["epsilon"]} if not math.isinf(r["epsilon"]) else {})}, step=i)
        text = table_text(rows, metric)
        mlflow.log_text(text, "sweep/privacy_utility.txt")
        mlflow.log_text(table_csv(rows), "sweep/privacy_utility.csv")
        mlflow.log_figure(curve_figure(rows, metric, p.target_epsilon if p else None, spec.name), "sweep/privacy_utility.png")
        result = {"federation": spec.name, "metric": metric, "rows": rows, "mlflow_run_id": parent.info.run_id}
        mlflow.log_dict(_jsonable(result), "sweep/privacy_utility.json")
    sys.stdout.write("\n" + text + "\n\n")
    sys.stdout.flush()
    if summary_path:
        out = Path(summary_path)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(_jsonable(result), indent=2))
        os.replace(tmp, out)
    return result
