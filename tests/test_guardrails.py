"""Guardrails of the promotion rule (ml/promotion.py), case by case, and what feeds them: the decision
read right per row and degenerate greedy answers (ml/evaluate.py), their settings (ml/config.py)."""

from __future__ import annotations

from typing import Any

import pytest

from ml.config import GuardrailConfig, PipelineConfig
from ml.evaluate import degenerate
from ml.promotion import Decision, Guard, Rule, guardrail, judge, with_guardrails

ACCURACY = Guard("decision_accuracy", margin=0.02, higher_is_better=True)
DEGENERATE = Guard("degenerate_answers", margin=0.0, higher_is_better=False)
BOOT = {"confidence": 0.95, "resamples": 2000, "seed": 0}
KEYS = [f"k{i}" for i in range(200)]


def values(right: int, of: int = 200) -> dict[str, float]:
    """Per-row 0/1 values: the first `right` rows 1, the rest 0."""
    return {k: float(i < right) for i, k in enumerate(KEYS[:of])}


def test_a_clearly_worse_guardrail_blocks_and_names_the_numbers() -> None:
    r = guardrail(ACCURACY, values(60), values(120), KEYS, **BOOT)  # 30 % right vs 60 %, 200 rows
    assert r.verdict == "blocks" and r.blocks and r.rows == 200
    assert (r.challenger, r.baseline) == pytest.approx((0.3, 0.6)) and r.change == pytest.approx(-0.3)
    assert r.low is not None and r.high is not None and r.low < -0.3 < r.high < -0.02
    assert "clearly worse" in r.note


def test_an_equal_guardrail_passes_as_no_worse() -> None:
    r = guardrail(ACCURACY, values(100), values(100), KEYS, **BOOT)
    assert r.verdict == "passes" and r.change == 0 and r.note == "no worse than the margin"


def test_a_drop_inside_the_noise_passes_and_says_so() -> None:
    few = KEYS[:20]
    r = guardrail(ACCURACY, values(9, 20), values(11, 20), few, **BOOT)  # 45 % vs 55 % of 20 rows
    assert r.verdict == "passes" and r.change == pytest.approx(-0.1)
    assert r.low is not None and r.high is not None and r.low < -0.02 < r.high
    assert "inside the noise" in r.note


def test_a_guardrail_measured_on_no_row_is_not_applicable_never_passed() -> None:
    r = guardrail(ACCURACY, {}, {}, KEYS, **BOOT, unit=": it needs a decision column")
    assert r.verdict == "not applicable" and not r.blocks and r.challenger is None
    assert r.note == "measured on no test row of both models: it needs a decision column"


def test_more_degenerate_answers_block_and_fewer_pass() -> None:
    worse = guardrail(DEGENERATE, values(120), values(20), KEYS, **BOOT)  # 60 % degenerate vs 10 %
    assert worse.verdict == "blocks" and worse.change == pytest.approx(0.5)
    better = guardrail(DEGENERATE, values(20), values(120), KEYS, **BOOT)
    assert better.verdict == "passes" and better.note == "no worse than the margin"


def test_the_guardrail_uses_only_rows_both_models_have_and_the_keys_given() -> None:
    challenger = {**values(0, 100), "extra": 1.0}
    r = guardrail(ACCURACY, challenger, values(100, 100), KEYS[:50], **BOOT)
    assert r.rows == 50 and r.challenger == 0.0 and r.baseline == 1.0


def _decision(outcome: str) -> Decision:
    return Decision(outcome, 1.0, 1.2, "champion v2", 0.01, "challenger 1.0000 beats champion v2 1.2000: ...",  # type: ignore[arg-type]
                    rows=200, improvement=0.2, low=0.1, high=0.3, confidence=0.95)


def test_a_blocking_guardrail_keeps_the_champion_whatever_the_loss_and_says_why() -> None:
    blocked = with_guardrails(_decision("promote"), [guardrail(ACCURACY, values(60), values(120), KEYS, **BOOT),
                                                      guardrail(DEGENERATE, values(0), values(0), KEYS, **BOOT)])
    assert blocked.outcome == "keep" and not blocked.promote
    assert blocked.reason.startswith("KEPT by the guardrail decision_accuracy: guardrail decision_accuracy: "
                                     "challenger 30.0% vs champion v2 60.0%, change -30.0%")
    assert "The loss alone: challenger 1.0000 beats" in blocked.reason and len(blocked.guardrails) == 2
    passing = with_guardrails(_decision("promote"), [guardrail(ACCURACY, values(100), values(100), KEYS, **BOOT)])
    assert passing.outcome == "promote" and passing.reason.endswith("; guardrails: decision_accuracy passes")
    kept = with_guardrails(_decision("keep"), [guardrail(ACCURACY, values(60), values(120), KEYS, **BOOT)])
    assert kept.outcome == "keep" and not kept.reason.startswith("KEPT by")


def test_a_decision_with_guardrails_survives_its_record() -> None:
    from dataclasses import asdict

    d = with_guardrails(_decision("promote"), [guardrail(ACCURACY, values(90), values(100), KEYS, **BOOT)])
    assert Decision.from_dict(asdict(d)) == d


def _scores(right: list[int], base_right: list[int], flaws: list[str | None], base_flaws: list[str | None],
            excluded: list[str] | None = None) -> dict[str, Any]:
    """A scores record (ml/scoring.py) where the challenger is better on loss on every row."""
    def rows(delta: float, rights: list[int]) -> list[dict[str, Any]]:
        return [{"key": f"k{i}", "nll": 100.0 - delta, "tokens": 50, "answer_bytes": 200, "decision_right": r}
                for i, r in enumerate(rights)]

    keys = [f"k{i}" for i in range(len(flaws))]
    return {"challenger": {"rows": rows(10.0, right)}, "baseline": {"rows": rows(0.0, base_right)},
            "identity": {"tokenizer": "tok"}, "baseline_tokenizer": "tok", "baseline_name": "base model",
            "excluded_rows": excluded or [], "review": None,
            "generations": {"keys": keys, "challenger": flaws, "baseline": base_flaws}}


RULE = Rule(min_delta=0.01, confidence=0.95, resamples=2000, seed=0, min_rows=20, guardrails=(ACCURACY, DEGENERATE))


def test_judge_reads_both_guardrails_from_a_scores_record_on_the_loss_rows() -> None:
    good = _scores([1] * 100, [1] * 100, [None] * 8, [None] * 8)
    d = judge(good, RULE)
    assert d.outcome == "promote" and [g.verdict for g in d.guardrails] == ["passes", "passes"]
    worse = _scores([0] * 60 + [1] * 40, [1] * 100, [None] * 8, [None] * 8)
    d = judge(worse, RULE)
    assert d.outcome == "keep" and "KEPT by the guardrail decision_accuracy" in d.reason
    # the flip: the same scores without that guardrail promote
    assert judge(worse, Rule(0.01, 0.95, 2000, 0, 20, (DEGENERATE,))).outcome == "promote"
    # the rows the champion trained on are left out of the guardrail as out of the loss
    left_out = _scores([0] * 60 + [1] * 40, [1] * 100, [None] * 8, [None] * 8, excluded=[f"k{i}" for i in range(60)])
    d = judge(left_out, RULE)
    assert d.outcome == "promote" and d.guardrails[0].rows == 40 and d.dropped_rows == 60


def test_judge_reports_a_guardrail_it_cannot_compute_as_not_applicable() -> None:
    none_read = _scores([None] * 100, [None] * 100, [], [])  # type: ignore[list-item]
    d = judge(none_read, RULE)
    assert d.outcome == "promote" and [g.verdict for g in d.guardrails] == ["not applicable"] * 2
    assert d.reason.endswith("; guardrails: decision_accuracy not applicable, degenerate_answers not applicable")
    assert d.guardrails[0].note.startswith("measured on no test row of both models: it needs a decision column")


@pytest.mark.parametrize(("answer", "stopped", "why"), [
    ("", True, "empty"), ("   ", True, "empty"),
    ("Yes. Smoking harms the lungs.", False, "never stopped"),
    ("no no no no no no no no", True, "repeats itself"),
    ("the risk rises. the risk rises. the risk rises.", True, "repeats itself"),
    ("Yes. Exercise lowers blood pressure in adults with hypertension.", True, None),
    ("Yes. The right answer is longer than the budget lets it end in.", False, None),  # budget too short: not judged
    ("네. 금연은 폐 기능을 개선한다.", True, None),
])
def test_degenerate_answers_are_empty_endless_or_repeating(answer: str, stopped: bool, why: str | None) -> None:
    fits = "longer than the budget" not in answer
    assert degenerate(answer, stopped, fits) == why


def test_guardrail_settings_have_one_direction_per_metric() -> None:
    assert [(g.metric, g.direction) for g in PipelineConfig().registry.guardrails] == [
        ("decision_accuracy", "higher"), ("degenerate_answers", "lower")]
    assert GuardrailConfig(metric="degenerate_answers").direction == "lower"
    with pytest.raises(ValueError, match="degenerate_answers is better when lower, not higher"):
        GuardrailConfig(metric="degenerate_answers", direction="higher")
    assert Rule.of(PipelineConfig().registry).guardrails == (ACCURACY, DEGENERATE)
