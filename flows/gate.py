"""Promotion gate: never promote a federated model that loses to the best single-site model.

On heterogeneous sites FedAvg can end up worse than a model trained on one hospital's data
alone, so the gate compares the candidate ("global", or each site's "personalised" model)
against every ``local-<site>`` model on every site's held-out test cases (higher is better).

``scores`` is ``{evaluated_at_site: {model_name: metric}}``; ``test_cases`` is ``{site: n}``.

``local_baselines`` says where the local-only models were scored: ``cross_site`` (every
``local-<k>`` at every site: the best single site is the best of them there) or ``own_site`` (each
site scored only its own, which never left it, e.g. under differential privacy: the best single
site is then the site's own local-only model, shown in one ``local-only`` column).
"""
from __future__ import annotations

import csv
import io
import math
import textwrap
from dataclasses import dataclass, field
from numbers import Integral, Real

from sitekit.spec import LOCAL_BASELINES  # the spec's own list of values

RULES = ("every_site", "weighted_mean")
OWN = "local-only"  # the column of each site's own local-only model under own_site
CANDIDATES = ("global", "personalised")
# A score equal to the threshold up to rounding counts as equal. Sites may report float32 means,
# whose rounding (~1e-7) would otherwise turn a tie in correct answers into a refusal; no metric
# fedward reports is meaningful at 1e-6 (an accuracy step is 1/n_test, a Dice step far larger).
_EPS = 1e-6


@dataclass(frozen=True)
class GateDecision:
    passed: bool
    rule: str
    candidate: str
    reason: str
    margins: dict[str, float] = field(default_factory=dict)  # per site (and "weighted_mean"): candidate - best single site


def _sites(scores: dict, test_cases: dict) -> list[str]:
    if not scores:
        raise ValueError("no scores: the gate needs at least one site's evaluation")
    sites = list(scores) + [s for s in test_cases if s not in scores]
    no_scores = [s for s in sites if s not in scores]
    if no_scores:
        raise ValueError(f"no scores for site(s) {', '.join(map(repr, no_scores))} (listed in test_cases)")
    no_cases = [s for s in sites if s not in test_cases]
    if no_cases:
        raise ValueError(f"no test-case count for site(s) {', '.join(map(repr, no_cases))}")
    for s in sites:
        n = test_cases[s]
        if isinstance(n, bool) or not isinstance(n, Integral) or n <= 0:
            raise ValueError(f"test_cases for site {s!r} must be a positive whole number, got {n!r}")
    return sites


def _local_models(scores: dict, sites: list[str]) -> list[str]:
    """``local-<site>`` for every site, plus any other ``local-*`` model that was evaluated."""
    models = [f"local-{s}" for s in sites]
    for s in sites:
        models += [m for m in scores[s] if m.startswith("local-") and m not in models]
    return models


def _score(scores: dict, site: str, model: str, *, required: bool = True) -> float | None:
    value = scores[site].get(model)
    if value is None:
        if required:
            raise ValueError(f"missing score: model {model!r} was not evaluated on site {site!r}")
        return None
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        raise ValueError(f"score of model {model!r} on site {site!r} is not a finite number: {value!r}")
    return float(value)


def _require(scores: dict, sites: list[str], model: str) -> None:
    missing = [s for s in sites if scores[s].get(model) is None]
    if missing:
        raise ValueError(f"missing score: model {model!r} was not evaluated on site(s) {', '.join(map(repr, missing))}")


def comparison_rows(scores: dict[str, dict[str, float]], test_cases: dict[str, int],
                    local_baselines: str = "cross_site") -> list[dict]:
    """One row per site: its test cases, every local-only model, the best of them, global, personalised, pooled."""
    if local_baselines not in LOCAL_BASELINES:
        raise ValueError(f"unknown local_baselines {local_baselines!r}; choose one of {', '.join(LOCAL_BASELINES)}")
    sites = _sites(scores, test_cases)
    _require(scores, sites, "global")
    if local_baselines == "own_site":
        locals_ = []
        for s in sites:
            _require(scores, [s], f"local-{s}")
            foreign = sorted(m for m in scores[s] if m.startswith("local-") and m != f"local-{s}")
            if foreign:  # a local-only model that should never have left its site
                raise ValueError(f"site {s!r} scored {', '.join(map(repr, foreign))}, but local_baselines is own_site: "
                                 "no site's local-only model may be scored anywhere but at its own site")
    else:
        locals_ = _local_models(scores, sites)
        for model in locals_:
            _require(scores, sites, model)
    rows = []
    for s in sites:
        row: dict = {"site": s, "test_cases": int(test_cases[s])}
        if local_baselines == "own_site":
            row[OWN] = _score(scores, s, f"local-{s}")
            best = f"local-{s}"
            row["best_single_site"] = row[OWN]
        else:
            for m in locals_:
                row[m] = _score(scores, s, m)
            best = max(locals_, key=lambda m: row[m])  # first in site order on ties
            row["best_single_site"] = row[best]
        row["best_single_site_model"] = best
        row["global"] = _score(scores, s, "global")
        row["personalised"] = _score(scores, s, "personalised", required=False)
        row["pooled"] = _score(scores, s, "pooled", required=False)
        rows.append(row)
    return rows


def _pair(a: float, b: float) -> tuple[str, str]:
    """Format two scores to 3 decimals, or more when 3 would print them equal."""
    for d in (3, 4, 5, 6):
        fa, fb = f"{a:.{d}f}", f"{b:.{d}f}"
        if fa != fb:
            break
    return fa, fb


def _owner(model: str) -> str:
    return model[len("local-"):]


def decide(scores: dict[str, dict[str, float]], test_cases: dict[str, int], rule: str = "every_site",
           candidate: str = "global", tolerance: float = 0.0, local_baselines: str = "cross_site") -> GateDecision:
    """Pass the candidate only if it is at least as good as the best single-site model (minus tolerance).

    every_site: on every site, candidate >= the best ``local-<k>`` score there - tolerance.
    weighted_mean: the candidate's test-case-weighted mean over sites >= the highest weighted mean
    of any one ``local-<k>`` model (the best single-site model, as one model) - tolerance; under
    ``own_site``, >= the weighted mean of the sites' own local-only models (each site on its own).
    """
    if rule not in RULES:
        raise ValueError(f"unknown gate rule {rule!r}; choose one of {', '.join(RULES)}")
    if candidate not in CANDIDATES:
        raise ValueError(f"unknown candidate {candidate!r}; choose one of {', '.join(CANDIDATES)}")
    if isinstance(tolerance, bool) or not isinstance(tolerance, Real) or not math.isfinite(tolerance) or tolerance < 0:
        raise ValueError(f"tolerance must be a finite number >= 0, got {tolerance!r}")
    rows = comparison_rows(scores, test_cases, local_baselines)
    _require(scores, [r["site"] for r in rows], candidate)
    what = f"the {candidate} model"
    tol = f" (tolerance {tolerance:.3f})" if tolerance else ""
    margins = {r["site"]: r[candidate] - r["best_single_site"] for r in rows}
    losing = [r for r in rows if r[candidate] < r["best_single_site"] - tolerance - _EPS]

    def lost_at(r: dict) -> str:
        c, b = _pair(r[candidate], r["best_single_site"])
        if local_baselines == "own_site":
            return f"on site {r['site']!r} {what} scores {c} < {b} for the site's own local-only model"
        return (f"on site {r['site']!r} {what} scores {c} < {b} for the local-only model of "
                f"{_owner(r['best_single_site_model'])!r} (best single site there)")

    if rule == "every_site":
        if losing:
            reason = "refused: " + ", and ".join(lost_at(r) for r in losing) + tol
        else:
            worst = min(rows, key=lambda r: margins[r["site"]])
            bar = "the site's own local-only model" if local_baselines == "own_site" else "the best single-site model"
            reason = (f"passed: on every site {what} scores at least {bar}{tol} "
                      f"(smallest margin {margins[worst['site']]:+.3f} on site {worst['site']!r})")
        return GateDecision(not losing, rule, candidate, reason, margins)

    total = sum(r["test_cases"] for r in rows)

    def mean(col: str) -> float:
        return sum(r["test_cases"] * r[col] for r in rows) / total

    locals_ = [k for k in rows[0] if k.startswith("local-")]
    best = max(locals_, key=mean)
    cand_mean, best_mean = mean(candidate), mean(best)
    margins["weighted_mean"] = cand_mean - best_mean
    passed = cand_mean >= best_mean - tolerance - _EPS
    c, b = _pair(cand_mean, best_mean)
    baseline = ("for the sites' own local-only models, each on its own test cases" if best == OWN else
                f"for the local-only model of {_owner(best)!r} (the best single-site model)")
    reason = (f"{'passed' if passed else 'refused'}: weighted by test cases over {len(rows)} site(s), {what} scores "
              f"{c} {'>=' if cand_mean >= best_mean - _EPS else '<'} {b} {baseline}{tol}")
    if losing:
        reason += f", though it loses to the best single-site model on site(s) {', '.join(repr(r['site']) for r in losing)}"
    return GateDecision(passed, rule, candidate, reason, margins)


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def table_csv(rows: list[dict]) -> str:
    """The comparison rows as CSV: a header, one line per site, 4 decimals, empty cell for a missing model."""
    if not rows:
        return ""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(list(rows[0]))
    for row in rows:
        w.writerow([_cell(row.get(k)) for k in rows[0]])
    return buf.getvalue()


def _series(rows: list[dict]) -> list[str]:
    """Model columns to show: every local model, global, then personalised / pooled if any site has them."""
    cols = [k for k in rows[0] if k.startswith("local-")] + ["global"]
    return cols + [k for k in ("personalised", "pooled") if any(r.get(k) is not None for r in rows)]


def table_markdown(rows: list[dict], decision: GateDecision) -> str:
    """The comparison as a markdown table; the last line states the gate decision."""
    cols = _series(rows)
    head = ["site", "test cases", *cols, "best single site", f"{decision.candidate} − best"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        margin = decision.margins.get(r["site"])
        cells = [r["site"], str(r["test_cases"]), *(_cell(r.get(c)) for c in cols),
                 f"{r['best_single_site']:.4f} ({r['best_single_site_model']})",
                 "" if margin is None else f"{margin:+.4f}"]
        lines.append("| " + " | ".join(cells) + " |")
    verdict = "PASSED" if decision.passed else "REFUSED"
    lines += ["", f"**Promotion gate ({decision.rule}, candidate {decision.candidate}): {verdict}** — {decision.reason}"]
    return "\n".join(lines)


def table_figure(rows: list[dict], metric_name: str, decision: GateDecision):
    """Grouped bars per site (each local model, global, personalised, pooled); best single site marked."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cols = _series(rows)
    n = len(cols)
    width = 0.8 / n
    fig = Figure(figsize=(2 + 0.35 * n * len(rows) + len(rows), 4.8))
    FigureCanvasAgg(fig)  # Agg, never a window
    ax = fig.add_subplot()
    colours = {"global": "tab:red", "personalised": "tab:purple", "pooled": "tab:gray"}
    local_colours = iter(["tab:blue", "tab:orange", "tab:green", "tab:brown", "tab:pink", "tab:olive", "tab:cyan"] * 10)
    for i, col in enumerate(cols):
        xs = [x + (i - (n - 1) / 2) * width for x, r in enumerate(rows) if r.get(col) is not None]
        ys = [r[col] for r in rows if r.get(col) is not None]
        label = {"global": "global (federated)", "pooled": "pooled (simulation)"}.get(col, col)
        ax.bar(xs, ys, width, label=label, color=colours.get(col) or next(local_colours))
    for x, r in enumerate(rows):
        ax.hlines(r["best_single_site"], x - 0.45, x + 0.45, colors="black", linestyles="--", linewidth=1.2,
                  label="best single site" if x == 0 else None)
    ax.set_xticks(range(len(rows)), [r["site"] for r in rows])
    values = [r[c] for r in rows for c in cols if r.get(c) is not None]
    ax.set_ylim(max(0.0, min(values) - 0.05), max(1.0, max(values) + 0.02))  # zoomed: the differences are small
    ax.set_ylabel(f"{metric_name} on the site's held-out test cases")
    verdict = "PASSED" if decision.passed else "REFUSED"
    title = f"Promotion gate ({decision.rule}, candidate {decision.candidate}): {verdict}\n{decision.reason}"
    ax.set_title("\n".join(textwrap.fill(line, width=int(fig.get_figwidth() * 11)) for line in title.splitlines()),
                 fontsize="small")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=min(n + 1, 4), fontsize="small")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig
