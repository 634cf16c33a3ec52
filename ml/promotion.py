"""The promotion rule, as pure functions over two score records (no I/O: every case is a unit test).

A challenger replaces the champion (or, before there is one, the bare base model) only when
1. the scores are comparable: both models scored the same answer text of the same test rows
   with the same tokenizer (loss per token counts tokens, and another tokenizer counts
   differently), and none of those rows was among the champion's training rows;
2. the improvement is beyond noise: a paired bootstrap over the rows gives the improvement in
   loss per answer token and its confidence interval, whose lower bound must exceed `min_delta`.
3. nothing the task cares about got clearly worse: each guardrail (a task metric per test row,
   such as the yes/no/maybe decision read right, or a degenerate greedy answer) is judged by the
   same paired bootstrap over the same rows; one whose interval lies entirely beyond its margin on
   the worse side keeps the champion, whatever the loss says.
When (1) fails the decision is `needs_review`, never an automatic promotion; when (2) or (3) fails
it is `keep`. Every reason carries the numbers, and per answer byte (nats, tokenizer-independent)
too. A guardrail that cannot be computed says so; it is never counted as passed. A champion moved by
a person after a run was evaluated is never overridden (`overruled`).
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
    """One test row under one model: summed answer-token NLL, its token count, its scored text's UTF-8
    bytes, and whether its yes/no/maybe decision was read right (1/0; None where none was read)."""
    key: str
    nll: float
    tokens: int
    answer_bytes: int
    decision_right: int | None = None


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
class Guard:
    """A guardrail: a task metric (a per-row 0/1 value, averaged) that must not get clearly worse
    than the comparator's by more than `margin` (in the metric's unit: a share)."""
    metric: str
    margin: float
    higher_is_better: bool


@dataclass(frozen=True)
class Rule:
    """The rule's settings (registry.min_delta, confidence, bootstrap_resamples, bootstrap_seed, min_rows,
    guardrails)."""
    min_delta: float
    confidence: float
    resamples: int
    seed: int
    min_rows: int
    guardrails: tuple[Guard, ...] = ()

    @classmethod
    def of(cls, reg: RegistryConfig) -> Rule:
        guards = tuple(Guard(g.metric, g.margin, g.direction == "higher") for g in reg.guardrails)
        return cls(reg.min_delta, reg.confidence, reg.bootstrap_resamples, reg.bootstrap_seed, reg.min_rows, guards)


@dataclass(frozen=True)
class GuardrailResult:
    """A guardrail judged: both models' values, the change (challenger - comparator, as the metric
    counts) and its paired bootstrap interval, and the verdict: `passes`, `blocks` or `not applicable`."""
    metric: str
    verdict: Literal["passes", "blocks", "not applicable"]
    note: str
    margin: float
    challenger: float | None = None
    baseline: float | None = None
    change: float | None = None
    low: float | None = None
    high: float | None = None
    rows: int = 0

    @property
    def blocks(self) -> bool:
        return self.verdict == "blocks"


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
class Review:
    """A person's answer to an approval request (registry.approval: required): `Promote` or `Keep`,
    who (None when nobody answered in time), when, and why."""
    answer: Literal["Promote", "Keep"]
    by: str | None
    at: str
    comment: str = ""
    timed_out: bool = False

    def __str__(self) -> str:
        if self.timed_out:
            return f"no answer by {self.at}"
        said = "approved" if self.answer == "Promote" else "rejected"
        return f"{said} by {self.by} at {self.at}" + (f": {self.comment}" if self.comment else "")


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
    guardrails: tuple[GuardrailResult, ...] = ()
    review: Review | None = None  # a person's answer, where one was asked (registry.approval: required)

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> Decision:
        """A decision as `dataclasses.asdict` wrote it (an evaluation record's)."""
        guards = tuple(GuardrailResult(**g) for g in record.get("guardrails") or ())
        review = Review(**record["review"]) if record.get("review") else None
        return cls(**{**record, "guardrails": guards, "review": review})

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


def guardrail(guard: Guard, challenger: Mapping[str, float], baseline: Mapping[str, float], keys: Sequence[str],
              *, confidence: float, resamples: int, seed: int, unit: str = "") -> GuardrailResult:
    """One guardrail over the rows of `keys` that both models have a value for, paired as the loss is
    (rows resampled with replacement, the same rows for both models): it blocks when the whole
    interval of the change lies on the worse side of the margin."""
    pairs = [(challenger[k], baseline[k]) for k in keys if k in challenger and k in baseline]
    if not pairs:
        return GuardrailResult(guard.metric, "not applicable", f"measured on no test row of both models{unit}",
                               guard.margin)
    c, b = np.array([p[0] for p in pairs], dtype=float), np.array([p[1] for p in pairs], dtype=float)
    idx = np.random.default_rng(seed).integers(0, len(pairs), size=(resamples, len(pairs)))
    tail = (1.0 - confidence) / 2 * 100
    low, high = (float(x) for x in np.percentile(c[idx].mean(axis=1) - b[idx].mean(axis=1), [tail, 100 - tail]))
    worse_by = -high if guard.higher_is_better else low  # how much worse at the least, at this confidence
    verdict: Literal["passes", "blocks"] = "blocks" if worse_by > guard.margin else "passes"
    near = low if guard.higher_is_better else -high  # how much better at the least
    note = ("clearly worse: its whole interval is past the margin" if verdict == "blocks" else
            "no worse than the margin" if -near <= guard.margin else
            "inside the noise: not clearly worse, but worse past the margin cannot be ruled out")
    return GuardrailResult(guard.metric, verdict, note, guard.margin, float(c.mean()), float(b.mean()),
                           float(c.mean() - b.mean()), low, high, len(pairs))


def describe(result: GuardrailResult, baseline_name: str) -> str:
    """One guardrail in a sentence: the values, the change and its interval, the verdict."""
    if result.verdict == "not applicable":
        return f"guardrail {result.metric}: not applicable ({result.note})"
    return (f"guardrail {result.metric}: challenger {result.challenger:.1%} vs {baseline_name} {result.baseline:.1%}, "
            f"change {result.change:+.1%} [{result.low:+.1%}, {result.high:+.1%}] over {result.rows} rows, margin "
            f"{result.margin:.1%}: {result.verdict} ({result.note})")


def with_guardrails(decision: Decision, results: Sequence[GuardrailResult]) -> Decision:
    """The decision with its guardrails judged: a promotion that a guardrail blocks is kept, its reason
    naming the guardrail with both values and the interval; otherwise the reason adds each verdict
    (`describe` says the rest)."""
    blocking = [r for r in results if r.blocks]
    if decision.promote and blocking:
        names = ", ".join(r.metric for r in blocking)
        said = "; ".join(describe(r, decision.baseline) for r in blocking)
        reason = f"KEPT by the guardrail {names}: {said}. The loss alone: {decision.reason}"
        return replace(decision, outcome="keep", reason=reason, guardrails=tuple(results))
    verdicts = ", ".join(f"{r.metric} {r.verdict}" for r in results)
    return replace(decision, reason=f"{decision.reason}; guardrails: {verdicts}" if results else decision.reason,
                   guardrails=tuple(results))


def judge(scores: Mapping[str, Any], rule: Rule) -> Decision:
    """The decision on a run's scores record (ml/scoring.py): its challenger against its comparator,
    leaving out the comparator's training rows, the loss first, then each guardrail on the same rows.
    A reason for review found while scoring (the base model changed under the champion, a champion
    that records no training rows) makes it needs_review whatever the numbers say."""
    challenger = Scores([RowScore(**r) for r in scores["challenger"]["rows"]], scores["identity"]["tokenizer"])
    baseline = Scores([RowScore(**r) for r in scores["baseline"]["rows"]], scores["baseline_tokenizer"])
    excluded = set(scores["excluded_rows"])
    decision = decide(challenger, baseline, scores["baseline_name"], rule, excluded)
    keys = [r.key for r in challenger.rows if r.key not in excluded]
    results = [guardrail(g, *_guard_values(g.metric, scores), keys, confidence=rule.confidence,
                         resamples=rule.resamples, seed=rule.seed, unit=GUARD_UNITS.get(g.metric, ""))
               for g in rule.guardrails]
    decision = with_guardrails(decision, results)
    if scores["review"] and decision.outcome != "needs_review":
        decision = replace(decision, outcome="needs_review",
                           reason=f"NEEDS REVIEW: {scores['review']}; scores: {decision.reason}")
    return decision


def reviewed(decision: Decision, review: Review) -> Decision:
    """The rule's promotion after a person's answer: approved, it stands; rejected, or not answered in
    time, the champion stays. Either way the answer is part of the decision and its reason."""
    if review.timed_out:
        head = f"NO ANSWER to the approval request ({review})"
    elif review.answer == "Promote" and review.by:
        return replace(decision, reason=f"{decision.reason}; APPROVED: {review}", review=review)
    elif review.answer == "Promote":
        head = "an approval without a logged identity is not taken"
    else:
        head = f"REJECTED: {review}"
    return replace(decision, outcome="keep", review=review,
                   reason=f"{head}; the champion stays. The rule alone: {decision.reason}")


def awaiting_approval(decision: Decision) -> Decision:
    """A promotion that needs a person's approval where nobody can be asked (`python -m ml pipeline`)."""
    return replace(decision, outcome="needs_review",
                   reason=f"NEEDS REVIEW: registry.approval is required and nobody was asked; a person promotes "
                          f"it with `python -m ml promote --version N --reason ...`. The rule: {decision.reason}")


def overruled(decision: Decision, alias: str, now: str | None, set_by: str) -> Decision:
    """A promotion that a person's later move of the alias (to version `now`) stops: needs_review."""
    reason = (f"NEEDS REVIEW: @{alias} was moved by hand ({set_by}) to v{now} after this run was evaluated against "
              f"{decision.baseline}; a person's choice is not overridden. Scores then: {decision.reason}")
    return replace(decision, outcome="needs_review", reason=reason)


# What a guardrail that was measured on no row lacked, by metric.
GUARD_UNITS = {"decision_accuracy": ": it needs a decision column and answers led by it (data.decision_column, "
                                    "data.lead_with_decision)",
               "degenerate_answers": ": no test prompt left room for eval.max_new_tokens within model.max_seq_length, "
                                     "or eval.sanity_prompts is 0"}


def _guard_values(metric: str, scores: Mapping[str, Any]) -> tuple[dict[str, float], dict[str, float]]:
    """(challenger, comparator) per-row values of a guardrail metric in a scores record."""
    gen = scores.get("generations") or {}

    def per_row(model: str) -> dict[str, float]:
        if metric == "decision_accuracy":
            return {r["key"]: float(r["decision_right"]) for r in scores[model]["rows"]
                    if r.get("decision_right") is not None}
        if metric == "degenerate_answers":
            return {k: float(why is not None) for k, why in zip(gen.get("keys", []), gen.get(model, []), strict=True)}
        raise ValueError(f"unknown guardrail metric {metric!r}")

    return per_row("challenger"), per_row("baseline")
