"""The promotion gate: a federated model that loses to the best single-site model is never promoted."""
import csv
import io

import pytest

from flows.gate import RULES, GateDecision, comparison_rows, decide, table_csv, table_figure, table_markdown

SITES = ("hospital-a", "hospital-b", "hospital-c")
CASES = {"hospital-a": 20, "hospital-b": 10, "hospital-c": 30}


def scores_where(global_: dict[str, float], **extra: dict[str, float]) -> dict[str, dict[str, float]]:
    """Local-only models: local-c is the best single site everywhere except at hospital-a (local-a)."""
    local = {
        "hospital-a": {"local-hospital-a": 0.930, "local-hospital-b": 0.850, "local-hospital-c": 0.920},
        "hospital-b": {"local-hospital-a": 0.900, "local-hospital-b": 0.930, "local-hospital-c": 0.941},
        "hospital-c": {"local-hospital-a": 0.880, "local-hospital-b": 0.860, "local-hospital-c": 0.950},
    }
    out = {s: {**local[s], "global": global_[s]} for s in SITES}
    for model, per_site in extra.items():
        for s, v in per_site.items():
            out[s][model] = v
    return out


GOOD = {"hospital-a": 0.940, "hospital-b": 0.945, "hospital-c": 0.955}
LOSES_ON_B = {"hospital-a": 0.940, "hospital-b": 0.912, "hospital-c": 0.955}


def test_every_site_passes_when_global_beats_the_best_single_site_everywhere():
    d = decide(scores_where(GOOD), CASES)
    assert isinstance(d, GateDecision)
    assert (d.passed, d.rule, d.candidate) == (True, "every_site", "global")
    assert d.reason.startswith("passed")
    assert d.margins == pytest.approx({"hospital-a": 0.010, "hospital-b": 0.004, "hospital-c": 0.005})
    assert "smallest margin +0.004 on site 'hospital-b'" in d.reason


def test_every_site_refuses_and_names_the_one_losing_site_and_both_numbers():
    d = decide(scores_where(LOSES_ON_B), CASES)
    assert not d.passed
    assert d.reason == ("refused: on site 'hospital-b' the global model scores 0.912 < 0.941 for the local-only model "
                        "of 'hospital-c' (best single site there)")
    assert "hospital-a" not in d.reason
    assert d.margins["hospital-b"] == pytest.approx(-0.029)
    assert d.margins["hospital-a"] > 0 and d.margins["hospital-c"] > 0


def test_every_site_names_every_losing_site():
    d = decide(scores_where({**LOSES_ON_B, "hospital-a": 0.901}), CASES)
    assert not d.passed
    assert "on site 'hospital-a' the global model scores 0.901 < 0.930 for the local-only model of 'hospital-a'" in d.reason
    assert "on site 'hospital-b' the global model scores 0.912 < 0.941" in d.reason
    assert "hospital-c' the global" not in d.reason


def test_weighted_mean_passes_where_every_site_fails():
    # Each site's own model wins at home, but neither single-site model generalises: the federated
    # model beats each of them as ONE model, while losing to the per-site maximum everywhere.
    scores = {
        "a": {"local-a": 0.90, "local-b": 0.70, "global": 0.85},
        "b": {"local-a": 0.70, "local-b": 0.90, "global": 0.85},
    }
    cases = {"a": 10, "b": 10}
    every = decide(scores, cases, rule="every_site")
    mean = decide(scores, cases, rule="weighted_mean")
    assert not every.passed and "'a'" in every.reason and "'b'" in every.reason
    assert mean.passed and mean.rule == "weighted_mean"
    assert mean.margins["weighted_mean"] == pytest.approx(0.05)
    assert mean.margins["a"] == pytest.approx(-0.05) and mean.margins["b"] == pytest.approx(-0.05)
    assert "0.850 >= 0.800" in mean.reason
    assert "loses to the best single-site model on site(s) 'a', 'b'" in mean.reason


def test_weighted_mean_weights_by_test_cases():
    # Unweighted, global (0.875) beats local-a (0.725); weighted 90:10 it does not (0.815 < 0.825).
    scores = {
        "big": {"local-big": 0.85, "local-small": 0.60, "global": 0.80},
        "small": {"local-big": 0.60, "local-small": 0.90, "global": 0.95},
    }
    assert decide(scores, {"big": 10, "small": 10}, rule="weighted_mean").passed
    d = decide(scores, {"big": 90, "small": 10}, rule="weighted_mean")
    assert not d.passed
    assert "the global model scores 0.815 < 0.825 for the local-only model of 'big'" in d.reason
    assert d.margins["weighted_mean"] == pytest.approx(-0.01)


def test_tolerance():
    scores = scores_where({**GOOD, "hospital-b": 0.936})  # 0.005 below local-c's 0.941
    assert not decide(scores, CASES).passed
    assert not decide(scores, CASES, tolerance=0.004).passed
    d = decide(scores, CASES, tolerance=0.005)  # exactly at the edge still passes
    assert d.passed and "tolerance 0.005" in d.reason
    assert d.margins["hospital-b"] == pytest.approx(-0.005)  # margins ignore the tolerance
    with pytest.raises(ValueError, match="tolerance"):
        decide(scores, CASES, tolerance=-0.01)


def test_weighted_mean_tolerance():
    scores = {"a": {"local-a": 0.90, "global": 0.89}}
    assert not decide(scores, {"a": 5}, rule="weighted_mean").passed
    assert decide(scores, {"a": 5}, rule="weighted_mean", tolerance=0.01).passed


def test_personalised_candidate_uses_each_sites_own_personalised_score():
    scores = scores_where(LOSES_ON_B, personalised={"hospital-a": 0.931, "hospital-b": 0.950, "hospital-c": 0.951})
    assert not decide(scores, CASES).passed
    d = decide(scores, CASES, candidate="personalised")
    assert d.passed and d.candidate == "personalised"
    assert d.margins == pytest.approx({"hospital-a": 0.001, "hospital-b": 0.009, "hospital-c": 0.001})
    scores["hospital-c"]["personalised"] = 0.940
    d = decide(scores, CASES, candidate="personalised")
    assert not d.passed
    assert "on site 'hospital-c' the personalised model scores 0.940 < 0.950" in d.reason
    assert decide(scores, CASES, rule="weighted_mean", candidate="personalised").candidate == "personalised"


@pytest.mark.parametrize("site, model, candidate", [
    ("hospital-b", "local-hospital-c", "global"),
    ("hospital-c", "global", "global"),
    ("hospital-a", "personalised", "personalised"),
])
def test_missing_score_is_an_error_naming_site_and_model(site, model, candidate):
    scores = scores_where(GOOD, personalised={"hospital-a": 0.95, "hospital-b": 0.95, "hospital-c": 0.96})
    del scores[site][model]
    for rule in RULES:
        with pytest.raises(ValueError, match=rf"'{model}'.*'{site}'"):
            decide(scores, CASES, rule=rule, candidate=candidate)


def test_bad_inputs_are_errors():
    with pytest.raises(ValueError, match="every_site, weighted_mean"):
        decide(scores_where(GOOD), CASES, rule="best_of")
    with pytest.raises(ValueError, match="candidate"):
        decide(scores_where(GOOD), CASES, candidate="pooled")
    with pytest.raises(ValueError, match="test-case count.*'hospital-c'"):
        decide(scores_where(GOOD), {"hospital-a": 20, "hospital-b": 10})
    with pytest.raises(ValueError, match="no scores.*'hospital-d'"):
        decide(scores_where(GOOD), {**CASES, "hospital-d": 5})
    with pytest.raises(ValueError, match="positive"):
        decide(scores_where(GOOD), {**CASES, "hospital-b": 0})
    with pytest.raises(ValueError, match="finite"):
        decide(scores_where({**GOOD, "hospital-a": float("nan")}), CASES)


def test_comparison_rows():
    rows = comparison_rows(scores_where(GOOD, pooled={"hospital-a": 0.96, "hospital-b": 0.95, "hospital-c": 0.97}), CASES)
    assert [r["site"] for r in rows] == list(SITES)
    b = rows[1]
    assert list(b) == ["site", "test_cases", "local-hospital-a", "local-hospital-b", "local-hospital-c",
                       "best_single_site", "best_single_site_model", "global", "personalised", "pooled"]
    assert b["test_cases"] == 10
    assert (b["best_single_site"], b["best_single_site_model"]) == (0.941, "local-hospital-c")
    assert rows[0]["best_single_site_model"] == "local-hospital-a"
    assert b["global"] == 0.945 and b["personalised"] is None and b["pooled"] == 0.95


def test_csv_round_trip():
    scores = scores_where(GOOD, personalised={"hospital-a": 0.93114})
    rows = comparison_rows(scores, CASES)
    parsed = list(csv.DictReader(io.StringIO(table_csv(rows))))
    assert len(parsed) == 3
    assert list(parsed[0]) == list(rows[0])
    for row, back in zip(rows, parsed):
        assert back["site"] == row["site"] and int(back["test_cases"]) == row["test_cases"]
        assert back["best_single_site_model"] == row["best_single_site_model"]
        for key in ("local-hospital-a", "local-hospital-b", "local-hospital-c", "best_single_site", "global"):
            assert float(back[key]) == pytest.approx(row[key], abs=5e-5)
        assert back["pooled"] == ""
    assert parsed[0]["personalised"] == "0.9311" and parsed[1]["personalised"] == ""
    assert parsed[0]["global"] == "0.9400"


def test_markdown_ends_with_the_decision():
    scores = scores_where(LOSES_ON_B)
    rows = comparison_rows(scores, CASES)
    d = decide(scores, CASES)
    md = table_markdown(rows, d)
    lines = md.splitlines()
    assert lines[0].startswith("| site | test cases | local-hospital-a |")
    assert "| hospital-b | 10 |" in md and "0.9410 (local-hospital-c)" in md and "-0.0290" in md
    assert "personalised" not in lines[0] and "pooled" not in lines[0]
    assert "REFUSED" in lines[-1] and d.reason in lines[-1]
    ok = table_markdown(rows, decide(scores_where(GOOD), CASES))
    assert "PASSED" in ok.splitlines()[-1]


def test_figure_has_one_bar_group_per_site_and_saves_png(tmp_path):
    from matplotlib.patches import Rectangle

    scores = scores_where(GOOD, personalised={"hospital-a": 0.95, "hospital-b": 0.95, "hospital-c": 0.96},
                          pooled={"hospital-a": 0.96, "hospital-b": 0.95, "hospital-c": 0.97})
    rows = comparison_rows(scores, CASES)
    d = decide(scores, CASES)
    fig = table_figure(rows, "Dice", d)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == list(SITES)
    # 3 local models + global + personalised + pooled, for each of 3 sites
    bars = [p for p in ax.patches if isinstance(p, Rectangle)]
    assert len(bars) == 6 * 3
    assert "PASSED" in ax.get_title() and "every_site" in ax.get_title()
    assert "best single site" in [t.get_text() for t in ax.get_legend().get_texts()]
    out = tmp_path / "comparison.png"
    fig.savefig(out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_figure_without_optional_models():
    scores = scores_where(LOSES_ON_B)
    fig = table_figure(comparison_rows(scores, CASES), "accuracy", decide(scores, CASES))
    ax = fig.axes[0]
    assert len(ax.patches) == 4 * 3
    assert "REFUSED" in ax.get_title() and "accuracy" in ax.get_ylabel()


def test_a_tie_in_correct_answers_passes_despite_float32_rounding():
    # Regression: the sites' float32 accuracies made 151/195 vs 151/195 print "0.774359 < 0.774359"
    # and refuse a model exactly as good as the best single site.
    import numpy as np

    f = lambda k, n: float(np.float32(k) / np.float32(n))  # noqa: E731
    scores = {"a": {"global": f(81, 104), "local-a": f(80, 104), "local-b": f(60, 104)},
              "b": {"global": f(70, 91), "local-a": f(71, 91), "local-b": f(50, 91)}}
    d = decide(scores, {"a": 104, "b": 91}, rule="weighted_mean")
    assert d.passed and "0.774359 < 0.774359" not in d.reason
    # one correct answer fewer is still a refusal
    scores["a"]["global"] = f(79, 104)
    assert not decide(scores, {"a": 104, "b": 91}, rule="weighted_mean").passed


# --------------------------------------------------------------------------- own_site: local models never leave their site

def own_only(global_: dict[str, float]) -> dict[str, dict[str, float]]:
    """Each site scored only its own local-only model (the cross-site scores of scores_where dropped)."""
    full = scores_where(global_)
    return {s: {"global": full[s]["global"], f"local-{s}": full[s][f"local-{s}"]} for s in SITES}


def test_own_site_compares_each_site_with_its_own_local_model():
    # at hospital-b this global model loses to local-c (0.941) but beats hospital-b's own model (0.930)
    beats_own = {**GOOD, "hospital-b": 0.935}
    assert not decide(scores_where(beats_own), CASES).passed
    d = decide(own_only(beats_own), CASES, local_baselines="own_site")
    assert d.passed and d.reason.startswith("passed: on every site the global model scores at least the site's own")
    assert d.margins["hospital-b"] == pytest.approx(0.935 - 0.930)
    rows = comparison_rows(own_only(beats_own), CASES, "own_site")
    assert [r["best_single_site_model"] for r in rows] == [f"local-{s}" for s in SITES]
    assert [r["local-only"] for r in rows] == [0.930, 0.930, 0.950]
    lost = decide(own_only({**GOOD, "hospital-c": 0.949}), CASES, local_baselines="own_site")
    assert lost.reason == "refused: on site 'hospital-c' the global model scores 0.949 < 0.950 for the site's own local-only model"


def test_own_site_weighted_mean_is_against_the_sites_own_models_together():
    scores = own_only({"hospital-a": 0.92, "hospital-b": 0.95, "hospital-c": 0.95})
    own_mean = (0.930 * 20 + 0.930 * 10 + 0.950 * 30) / 60
    d = decide(scores, CASES, rule="weighted_mean", local_baselines="own_site")
    assert d.margins["weighted_mean"] == pytest.approx((0.92 * 20 + 0.95 * 10 + 0.95 * 30) / 60 - own_mean)
    assert d.passed is (d.margins["weighted_mean"] >= 0) and "the sites' own local-only models" in d.reason
    # the same columns render: one local-only column, no empty cells for models that were never shared
    text = table_markdown(comparison_rows(scores, CASES, "own_site"), d)
    assert "| local-only |" in text and "local-hospital-b |" not in text.splitlines()[0]
    assert table_csv(comparison_rows(scores, CASES, "own_site")).splitlines()[0].split(",")[2] == "local-only"


def test_own_site_refuses_a_local_model_scored_away_from_home_and_a_missing_own_one():
    leaked = own_only(GOOD)
    leaked["hospital-b"]["local-hospital-a"] = 0.9
    with pytest.raises(ValueError, match="site 'hospital-b' scored 'local-hospital-a', but local_baselines is own_site"):
        decide(leaked, CASES, local_baselines="own_site")
    missing = own_only(GOOD)
    del missing["hospital-c"]["local-hospital-c"]
    with pytest.raises(ValueError, match="model 'local-hospital-c' was not evaluated on site\\(s\\) 'hospital-c'"):
        comparison_rows(missing, CASES, "own_site")
    with pytest.raises(ValueError, match="unknown local_baselines 'nowhere'"):
        comparison_rows(own_only(GOOD), CASES, "nowhere")
