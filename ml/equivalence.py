"""Is a merged model the adapter model that was evaluated? The check an export passes before it is
recorded (ml/export.py).

Two models are measured the same way on the version's frozen test rows (`measure`): each row's mean
loss per answer token (ml/evaluate.py's scoring) and the greedy continuations of the first prompts
that leave room for `CONTINUATION_TOKENS` tokens. The merged model is equivalent to the adapter
model when the mean per-row loss differs by at most `LOSS_TOLERANCE` (relative) and at least
`TOKEN_MATCH` of the continuations' tokens are identical (`within`). The check means something only
if it can fail: the bare base model (the adapter switched off) must fall outside those bounds, or a
merge that lost the adapter, or an adapter that does nothing, would pass (`Check.passed`).

The comparisons are pure functions over two `Measurement`s, unit-tested; `measure` runs a model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from ml.data import QAExample
from ml.evaluate import evaluate_model, greedy_ids, sample_rows
from ml.prompt import PromptFormat

if TYPE_CHECKING:
    from transformers import PreTrainedModel as Model
    from transformers import PreTrainedTokenizerBase as Tokenizer

LOSS_TOLERANCE = 0.005  # relative difference of the mean per-row loss (0.5 %)
TOKEN_MATCH = 0.99  # share of the continuations' tokens that must be identical
CONTINUATION_TOKENS = 32  # greedy tokens compared per prompt


@dataclass(frozen=True)
class Measurement:
    """One model on the test rows: each row's loss per answer token, by row key, and the greedy
    continuation (token ids, up to and with an end token) of each compared prompt, in order."""
    row_losses: dict[str, float]
    continuations: list[list[int]]

    @property
    def mean_loss(self) -> float:
        return mean_row_loss(self.row_losses)


@dataclass(frozen=True)
class Comparison:
    """How far a model is from the reference (the adapter model): the relative difference of the
    mean per-row loss over the rows both scored, and the share of identical continuation tokens."""
    loss_gap: float
    token_match: float
    rows: int
    prompts: int


def mean_row_loss(row_losses: dict[str, float], keys: Sequence[str] | None = None) -> float:
    values = [row_losses[k] for k in (row_losses if keys is None else keys)]
    if not values:
        raise ValueError("no test row was scored: nothing to compare")
    return sum(values) / len(values)


def loss_gap(reference: dict[str, float], other: dict[str, float]) -> tuple[float, int]:
    """(|mean other - mean reference| / mean reference, rows) over the rows both scored."""
    keys = [k for k in reference if k in other]
    ref = mean_row_loss(reference, keys)
    gap = abs(mean_row_loss(other, keys) - ref) / ref if ref else math.inf
    return gap, len(keys)


def token_match(reference: Sequence[Sequence[int]], other: Sequence[Sequence[int]],
                tokens: int = CONTINUATION_TOKENS) -> float:
    """The share of the first `tokens` positions of each continuation where both agree. A position
    past an end token counts as agreeing when both ended there: the same short answer is identical
    in full; after the first disagreement every later position counts as different (what follows a
    different token is another continuation, whatever its tokens)."""
    if len(reference) != len(other):
        raise ValueError(f"{len(reference)} continuations against {len(other)}: not the same prompts")
    if not reference:
        raise ValueError("no prompt was continued: nothing to compare")
    same = 0
    for a, b in zip(reference, other, strict=True):
        a, b = list(a[:tokens]), list(b[:tokens])
        if a == b:
            same += tokens
            continue
        same += next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
    return same / (tokens * len(reference))


def compare(reference: Measurement, other: Measurement) -> Comparison:
    gap, rows = loss_gap(reference.row_losses, other.row_losses)
    return Comparison(gap, token_match(reference.continuations, other.continuations), rows,
                      len(reference.continuations))


def within(c: Comparison) -> bool:
    """The two models are the same model, as far as the check can tell."""
    return c.loss_gap <= LOSS_TOLERANCE and c.token_match >= TOKEN_MATCH


@dataclass(frozen=True)
class Check:
    """The merged model against the adapter model (`merged`), and the bare base against it (`base`)."""
    merged: Comparison
    base: Comparison

    @property
    def passed(self) -> bool:
        return within(self.merged) and not within(self.base)

    @property
    def reason(self) -> str:
        m, b = self.merged, self.base
        said = (f"the merged model's mean per-row test loss differs from the adapter model's by {m.loss_gap:.3%} "
                f"(at most {LOSS_TOLERANCE:.1%}) over {m.rows} rows, and {m.token_match:.1%} of the first "
                f"{CONTINUATION_TOKENS} greedy tokens of {m.prompts} test prompts are identical (at least "
                f"{TOKEN_MATCH:.0%}); the bare base model: {b.loss_gap:.3%} and {b.token_match:.1%}")
        if not within(m):
            return f"FAILED: {said}: the merged model is not the adapter model that was evaluated"
        if within(b):
            return (f"FAILED: {said}: the adapter is not measurably different from the bare base model, so the "
                    "check cannot tell a merge that lost it")
        return f"passed: {said}"

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "reason": self.reason, "merged": asdict(self.merged),
                "base": asdict(self.base), "loss_tolerance": LOSS_TOLERANCE, "token_match_min": TOKEN_MATCH,
                "continuation_tokens": CONTINUATION_TOKENS}


def prompts(tokenizer: Tokenizer, test: Sequence[QAExample], fmt: PromptFormat, n: int) -> list[QAExample]:
    """The first `n` test rows whose prompt leaves room for the compared continuation."""
    return sample_rows(tokenizer, test, fmt, n, CONTINUATION_TOKENS)


def measure(model: Model, tokenizer: Tokenizer, test: Sequence[QAExample], asked: Sequence[QAExample],
            fmt: PromptFormat, batch_size: int) -> Measurement:
    """`model` on the test rows (loss per answer token of each) and on the `asked` prompts (greedy
    continuations), scored as the evaluation scores (ml/evaluate.py)."""
    model.eval()
    result = evaluate_model(model, tokenizer, test, fmt, batch_size)
    assert result.rows is not None
    return Measurement({r.key: r.nll / r.tokens for r in result.rows},
                       greedy_ids(model, tokenizer, asked, fmt, CONTINUATION_TOKENS, batch_size))
