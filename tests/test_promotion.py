"""The promotion rule (ml/promotion.py): pure functions, every case without a model or a server."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from ml.promotion import Decision, Review, RowScore, Rule, Scores, awaiting_approval, decide, paired_bootstrap, reviewed

RULE = Rule(min_delta=0.01, confidence=0.95, resamples=2000, seed=0, min_rows=20)


def rows(losses: list[float], tokens: int = 50, answer_bytes: int = 200) -> list[RowScore]:
    """Rows scored at `losses` per token (nll = loss x tokens)."""
    return [RowScore(f"k{i}", loss * tokens, tokens, answer_bytes) for i, loss in enumerate(losses)]


def noisy(n: int, mean: float, spread: float, seed: int) -> list[float]:
    return list(np.random.default_rng(seed).normal(mean, spread, n))


def test_a_clear_improvement_on_every_row_is_promoted_with_its_interval() -> None:
    base = noisy(40, 2.0, 0.3, 1)
    d = decide(Scores(rows([x - 0.2 for x in base]), "tok"), Scores(rows(base), "tok"), "champion v1", RULE)
    assert d.outcome == "promote" and d.rows == 40
    assert d.improvement == pytest.approx(0.2) and d.low is not None and 0.01 < d.low <= 0.2 <= (d.high or 0)
    assert "[+0.2000, +0.2000]" in d.reason and "40 rows" in d.reason and "champion v1" in d.reason


def test_a_difference_inside_the_noise_is_kept_and_says_the_split_is_too_small() -> None:
    base = noisy(30, 2.0, 0.3, 1)
    challenger = [b + e for b, e in zip(base, noisy(30, -0.02, 0.3, 2), strict=True)]  # 0.02 better, noise 0.3
    d = decide(Scores(rows(challenger), "tok"), Scores(rows(base), "tok"), "champion v1", RULE)
    assert d.outcome == "keep" and d.low is not None and d.low < 0.01 < (d.high or 0)
    assert "too small to detect an improvement of 0.01" in d.reason


def test_a_tie_is_kept() -> None:
    base = rows(noisy(30, 2.0, 0.3, 1))
    assert decide(Scores(base, "tok"), Scores(base, "tok"), "base model", RULE).outcome == "keep"


def test_a_clearly_worse_challenger_is_kept_without_blaming_the_split() -> None:
    base = noisy(30, 2.0, 0.3, 1)
    challenger = [b + e for b, e in zip(base, noisy(30, 0.3, 0.1, 2), strict=True)]
    d = decide(Scores(rows(challenger), "tok"), Scores(rows(base), "tok"), "champion v1", RULE)
    assert d.outcome == "keep" and (d.high or 0) < 0 and "too small" not in d.reason


def test_another_tokenizer_needs_review_and_reports_loss_per_byte() -> None:
    # fewer, longer tokens score lower per token yet worse per byte: per token would promote
    challenger = Scores(rows([5.98] * 30, tokens=40), "small-vocab")
    champion = Scores(rows([6.52] * 30, tokens=25), "llama3")
    d = decide(challenger, champion, "champion v2", RULE)
    assert d.outcome == "needs_review" and not d.promote
    assert "different tokenizers" in d.reason and "per answer byte" in d.reason
    assert (d.challenger_nats_per_byte or 0) > (d.baseline_nats_per_byte or 0)


def test_rows_the_champion_trained_on_are_left_out_and_too_few_left_need_review() -> None:
    base = noisy(30, 2.0, 0.1, 1)
    c, b = Scores(rows([x - 0.3 for x in base]), "tok"), Scores(rows(base), "tok")
    d = decide(c, b, "champion v1", RULE, exclude={"k0", "k1", "k2"})
    assert (d.rows, d.dropped_rows, d.outcome) == (27, 3, "promote")
    d = decide(c, b, "champion v1", RULE, exclude={f"k{i}" for i in range(15)})
    assert d.outcome == "needs_review" and "15 dropped" in d.reason and "min_rows=20" in d.reason


def test_a_different_scored_answer_text_needs_review() -> None:
    base = rows(noisy(30, 2.0, 0.1, 1))
    shorter = [RowScore(r.key, r.nll, r.tokens - 5, r.answer_bytes - 20) if i < 4 else r for i, r in enumerate(base)]
    d = decide(Scores(shorter, "tok"), Scores(base, "tok"), "champion v1", RULE)
    assert d.outcome == "needs_review" and "4 of 30 rows" in d.reason


def test_the_bootstrap_is_paired_seeded_and_brackets_its_estimate() -> None:
    base = rows(noisy(25, 2.0, 0.5, 3))
    better = [RowScore(r.key, r.nll - 2.5, r.tokens, r.answer_bytes) for r in base]  # -0.05 per token everywhere
    iv = paired_bootstrap(better, base, confidence=0.95, resamples=500, seed=7)
    # paired: the rows' own spread (0.5) cancels, the interval is the constant difference
    assert iv.low == pytest.approx(0.05) and iv.high == pytest.approx(0.05)
    shuffled = rows(noisy(25, 1.95, 0.5, 4))
    a = paired_bootstrap(shuffled, base, confidence=0.95, resamples=500, seed=7)
    assert a == paired_bootstrap(shuffled, base, confidence=0.95, resamples=500, seed=7)
    assert a.low < a.improvement < a.high and a.high - a.low > 0.1


def _promoted() -> Any:
    base = noisy(40, 2.0, 0.3, 1)
    return decide(Scores(rows([x - 0.2 for x in base]), "tok"), Scores(rows(base), "tok"), "champion v1", RULE)


def test_an_approved_promotion_stands_and_says_who_approved_it() -> None:
    d = reviewed(_promoted(), Review("Promote", "alice", "2026-12-06T10:00:00+00:00", "answers read well"))
    assert d.outcome == "promote" and d.review is not None and d.review.by == "alice"
    assert d.reason.endswith("; APPROVED: approved by alice at 2026-12-06T10:00:00+00:00: answers read well")


def test_a_rejection_an_unanswered_request_or_an_anonymous_approval_keeps_the_champion() -> None:
    rejected = reviewed(_promoted(), Review("Keep", "bob", "2026-12-06T10:00:00+00:00", "too verbose"))
    assert rejected.outcome == "keep"
    assert rejected.reason.startswith("REJECTED: rejected by bob at 2026-12-06T10:00:00+00:00: too verbose; the "
                                      "champion stays. The rule alone: challenger")
    late = reviewed(_promoted(), Review("Keep", None, "2026-12-09T10:00:00+00:00", timed_out=True))
    assert late.outcome == "keep" and late.reason.startswith("NO ANSWER to the approval request (no answer by 2026")
    anonymous = reviewed(_promoted(), Review("Promote", None, "2026-12-06T10:00:00+00:00"))
    assert anonymous.outcome == "keep" and "without a logged identity is not taken" in anonymous.reason


def test_nobody_to_ask_is_a_review_not_a_promotion() -> None:
    d = awaiting_approval(_promoted())
    assert d.outcome == "needs_review" and "python -m ml promote --version N" in d.reason


def test_a_reviewed_decision_survives_its_record() -> None:
    from dataclasses import asdict

    d = reviewed(_promoted(), Review("Promote", "alice", "2026-12-06T10:00:00+00:00", "ok"))
    assert Decision.from_dict(asdict(d)) == d
