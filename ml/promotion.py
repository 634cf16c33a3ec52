"""The promotion rule, as pure functions over two score records (no I/O: every case is a unit test).

A challenger replaces the champion (or, before there is one, the bare base model) only when
1. the scores are comparable: both models scored the same answer text of the same test rows
   with the same tokenizer (loss per token counts tokens, and another tokenizer counts
   differently), and none of those rows was among the champion's training rows;
2. the improvement is beyond noise: a paired bootstrap over the rows gives the improvement in
   loss per answer token and its confidence interval, whose lower bound must exceed `min_delta`.
When (1) fails the decision is `needs_review`, never an automatic promotion; when (2) fails it is
`keep`. Every reason carries the numbers, and per answer byte (nats, tokenizer-independent) too.
A champion moved by a person after a run was evaluated is never overridden (`overruled`).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import numpy as np

from ml.config import RegistryConfig

Outcome = Literal["promote", "keep", "needs_review"]


@dataclass(frozen=True)
class RowScore:
    """One test row under one model: summed answer-token NLL, its token count, its scored text's UTF-8 bytes."""
    key: str
    nll: float
    tokens: int
    answer_bytes: int


@dataclass(frozen=True)
class Scores:
    """One model's scores on one test split and what they depend on."""
    rows: Sequence[RowScore]
    tokenizer: str  # fingerprint (ml.identity.tokenizer_fingerprint)

    @property
    def loss(self) -> float:
        """Loss per answer token (micro-average, as in training)."""
        return sum(r.nll for r in self.rows) / max(1, sum(r.tokens for r in self.rows))

    @property
    def nats_per_byte(self) -> float:
        """Loss per byte of the scored answer text: comparable across tokenizers."""
        return sum(r.nll for r in self.rows) / max(1, sum(r.answer_bytes for r in self.rows))


@dataclass(frozen=True)
class Rule:
    """The rule's settings (registry.min_delta, confidence, bootstrap_resamples, bootstrap_seed, min_rows)."""
    min_delta: float
    confidence: float
    resamples: int
    seed: int
    min_rows: int

    @classmethod
    def of(cls, reg: RegistryConfig) -> Rule:
        return cls(reg.min_delta, reg.confidence, reg.bootstrap_resamples, reg.bootstrap_seed, reg.min_rows)


@dataclass(frozen=True)
class Interval:
    """The mean improvement (baseline loss - challenger loss, per answer token) and its paired bootstrap interval."""
    improvement: float
    low: float
    high: float
    confidence: float
    resamples: int
    seed: int


@dataclass(frozen=True)
class Decision:
    outcome: Outcome
    challenger_loss: float
    baseline_loss: float
    baseline: str  # "champion v3" or "base model"
    min_delta: float
    reason: str
    rows: int = 0  # test rows compared
    dropped_rows: int = 0  # test rows left out: the champion trained on them
    improvement: float | None = None
    low: float | None = None
    high: float | None = None
    confidence: float | None = None
    resamples: int | None = None
    seed: int | None = None
    challenger_nats_per_byte: float | None = None
    baseline_nats_per_byte: float | None = None

    @property
    def promote(self) -> bool:
        return self.outcome == "promote"


def paired_bootstrap(challenger: Sequence[RowScore], baseline: Sequence[RowScore], *, confidence: float,
                     resamples: int, seed: int) -> Interval:
    """Rows resampled with replacement, the same rows for both models each time; the improvement in
    loss per token is recomputed on each resample. Rows must be paired (same keys, same order)."""
    nll_c = np.array([r.nll for r in challenger])
    nll_b = np.array([r.nll for r in baseline])
    tokens = np.array([r.tokens for r in challenger], dtype=float)
    improvement = float((nll_b.sum() - nll_c.sum()) / tokens.sum())
    idx = np.random.default_rng(seed).integers(0, len(tokens), size=(resamples, len(tokens)))
    samples = (nll_b[idx].sum(axis=1) - nll_c[idx].sum(axis=1)) / tokens[idx].sum(axis=1)
    tail = (1.0 - confidence) / 2 * 100
    low, high = np.percentile(samples, [tail, 100 - tail])
    return Interval(improvement, float(low), float(high), confidence, resamples, seed)


def decide(challenger: Scores, baseline: Scores, baseline_name: str, rule: Rule,
           exclude: Collection[str] = ()) -> Decision:
    """The decision on `challenger` vs `baseline`, over the rows both scored minus `exclude` (the
    champion's training rows)."""
    min_delta, confidence, resamples, seed = rule.min_delta, rule.confidence, rule.resamples, rule.seed
    base_rows = {r.key: r for r in baseline.rows}
    kept = [r for r in challenger.rows if r.key in base_rows and r.key not in exclude]
    dropped = sum(1 for r in challenger.rows if r.key in exclude)
    pairs_c, pairs_b = kept, [base_rows[r.key] for r in kept]
    c, b = Scores(pairs_c, challenger.tokenizer), Scores(pairs_b, baseline.tokenizer)
    common = {"challenger_loss": c.loss, "baseline_loss": b.loss, "baseline": baseline_name, "min_delta": min_delta,
              "rows": len(kept), "dropped_rows": dropped, "challenger_nats_per_byte": c.nats_per_byte,
              "baseline_nats_per_byte": b.nats_per_byte}
    per_byte = (f"per answer byte: challenger {c.nats_per_byte:.4f} vs {baseline_name} "
                f"{b.nats_per_byte:.4f} nats")

    def review(why: str) -> Decision:
        return Decision("needs_review", reason=f"NEEDS REVIEW: {why}; {per_byte}", **common)  # type: ignore[arg-type]

    if challenger.tokenizer != baseline.tokenizer:
        return review(f"the challenger and {baseline_name} use different tokenizers, so their losses per token "
                      f"({c.loss:.4f} vs {b.loss:.4f}) count different units")
    if len(kept) < rule.min_rows:
        gone = f" ({dropped} dropped: {baseline_name} trained on them)" if dropped else ""
        return review(f"only {len(kept)} comparable test rows{gone}, fewer than registry.min_rows={rule.min_rows}")
    changed = sum(1 for x, y in zip(pairs_c, pairs_b, strict=True)
                  if (x.tokens, x.answer_bytes) != (y.tokens, y.answer_bytes))
    if changed:
        return review(f"{changed} of {len(kept)} rows were scored on different answer text (prompt settings or "
                      f"max_seq_length differ: another lead or truncation)")

    iv = paired_bootstrap(pairs_c, pairs_b, confidence=confidence, resamples=resamples, seed=seed)
    promote = iv.low > min_delta
    verdict = "beats" if promote else "does not beat"
    reason = (f"challenger {c.loss:.4f} {verdict} {baseline_name} {b.loss:.4f}: improvement {iv.improvement:+.4f} "
              f"per answer token, {confidence:.0%} interval [{iv.low:+.4f}, {iv.high:+.4f}] over {len(kept)} rows"
              f"{f' ({dropped} left out: {baseline_name} trained on them)' if dropped else ''}; "
              f"{'its lower bound is above' if promote else 'promotion needs its lower bound above'} "
              f"min_delta={min_delta:g}; {per_byte}")
    half = (iv.high - iv.low) / 2
    if not promote and iv.high > min_delta and half > min_delta:  # inconclusive, not clearly worse
        reason += (f". This split is too small to detect an improvement of {min_delta:g}: at {len(kept)} rows "
                   f"only improvements above about {min_delta + half:.3f} can be told from noise")
    return Decision("promote" if promote else "keep", reason=reason, improvement=iv.improvement, low=iv.low,
                    high=iv.high, confidence=confidence, resamples=resamples, seed=seed, **common)  # type: ignore[arg-type]


def judge(scores: Mapping[str, Any], rule: Rule) -> Decision:
    """The decision on a run's scores record (ml/scoring.py): its challenger against its comparator,
    leaving out the comparator's training rows. A reason for review found while scoring (the base
    model changed under the champion, a champion that records no training rows) makes it
    needs_review whatever the numbers say."""
    challenger = Scores([RowScore(**r) for r in scores["challenger"]["rows"]], scores["identity"]["tokenizer"])
    baseline = Scores([RowScore(**r) for r in scores["baseline"]["rows"]], scores["baseline_tokenizer"])
    decision = decide(challenger, baseline, scores["baseline_name"], rule, set(scores["excluded_rows"]))
    if scores["review"] and decision.outcome != "needs_review":
        decision = replace(decision, outcome="needs_review",
                           reason=f"NEEDS REVIEW: {scores['review']}; scores: {decision.reason}")
    return decision


def overruled(decision: Decision, alias: str, now: str | None, set_by: str) -> Decision:
    """A promotion that a person's later move of the alias (to version `now`) stops: needs_review."""
    reason = (f"NEEDS REVIEW: @{alias} was moved by hand ({set_by}) to v{now} after this run was evaluated against "
              f"{decision.baseline}; a person's choice is not overridden. Scores then: {decision.reason}")
    return replace(decision, outcome="needs_review", reason=reason)
