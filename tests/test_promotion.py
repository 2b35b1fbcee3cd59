"""Champion/challenger decisions on hand-made scores (the real registry is exercised in test_operations.py)."""
from __future__ import annotations

from pathlib import Path

import pytest

from flows.gate import GateDecision
from flows.promotion import CHALLENGER, CHAMPION, Champion, decide

CASES = {"a": 30, "b": 10}
PASSED = GateDecision(True, "weighted_mean", "global", "passed: (gate reason)")
REFUSED = GateDecision(False, "weighted_mean", "global", "refused: (gate reason)")
CHAMP = Champion("3", Path("champion.pt"), "version 3")


def scores(new_a, new_b, champ_a=None, champ_b=None):
    out = {"a": {"global": new_a, "local-a": 0.5, "local-b": 0.5}, "b": {"global": new_b, "local-a": 0.5, "local-b": 0.5}}
    if champ_a is not None:
        out["a"]["champion"], out["b"]["champion"] = champ_a, champ_b
    return out


def test_first_champion_needs_only_the_gate():
    d = decide(scores(0.8, 0.7), CASES, PASSED, Champion(None, None, "no champion yet"))
    assert (d.promote, d.alias, d.champion_version) == (True, CHAMPION, None)
    assert d.reason == "promoted: there was no champion yet and it passed the promotion gate"
    d = decide(scores(0.8, 0.7), CASES, REFUSED, Champion(None, None, "no champion yet"))
    assert (d.promote, d.alias) == (False, CHALLENGER) and "(refused: (gate reason))" in d.reason


def test_better_weighted_mean_is_promoted_with_the_numbers():
    # new: (30*0.80 + 10*0.60)/40 = 0.75; champion: (30*0.70 + 10*0.70)/40 = 0.70
    d = decide(scores(0.80, 0.60, 0.70, 0.70), CASES, PASSED, CHAMP, rule="weighted_mean")
    assert d.promote and d.alias == CHAMPION and d.champion_version == "3"
    assert "0.7500 > 0.7000 for champion version 3" in d.reason
    assert d.margins["a"] == pytest.approx(0.10) and d.margins["b"] == pytest.approx(-0.10)
    assert d.margins["weighted_mean"] == pytest.approx(0.05)


def test_every_site_rule_also_requires_no_site_to_get_worse():
    d = decide(scores(0.80, 0.60, 0.70, 0.70), CASES, PASSED, CHAMP, rule="every_site")
    assert not d.promote and d.alias == CHALLENGER
    assert "scores below the champion on site(s) 'b' (0.6000 < 0.7000)" in d.reason
    assert "rule every_site" in d.reason
    d = decide(scores(0.80, 0.70, 0.70, 0.70), CASES, PASSED, CHAMP, rule="every_site")
    assert d.promote


def test_equal_is_not_better():
    d = decide(scores(0.7, 0.7, 0.7, 0.7), CASES, PASSED, CHAMP)
    assert not d.promote and "0.7000 = 0.7000" in d.reason


def test_worse_model_that_passed_the_gate_stays_challenger():
    d = decide(scores(0.6, 0.6, 0.7, 0.7), CASES, PASSED, CHAMP)
    assert (d.promote, d.alias) == (False, CHALLENGER)
    assert d.reason.startswith("not promoted: it passed the promotion gate but is not better than the champion")
    assert "0.6000 < 0.7000 for champion version 3" in d.reason


def test_gate_refusal_wins_even_over_a_worse_champion_and_both_reasons_are_given():
    d = decide(scores(0.9, 0.9, 0.5, 0.5), CASES, REFUSED, CHAMP)
    assert not d.promote
    assert d.reason.startswith("not promoted: the promotion gate refused it (refused: (gate reason))")
    assert "against the champion, weighted by test cases over 2 site(s) it scores 0.9000 > 0.5000" in d.reason


def test_incomparable_champion_is_left_to_a_person():
    d = decide(scores(0.9, 0.9), CASES, PASSED, Champion("4", None, "version 4 has a different architecture"))
    assert not d.promote and d.alias == CHALLENGER
    assert "cannot be compared on scores (version 4 has a different architecture)" in d.reason
    assert "move the alias by hand" in d.reason


def test_champion_score_missing_at_a_site_is_an_error():
    s = scores(0.8, 0.8, 0.7, 0.7)
    del s["b"]["champion"]
    with pytest.raises(ValueError, match="not evaluated on site\\(s\\) 'b'"):
        decide(s, CASES, PASSED, CHAMP)
