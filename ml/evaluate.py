"""Held-out loss per answer token, computed the same way for every model.

The challenger, the champion and the bare base model are all scored by
`token_loss` on the same encoded test split: summed negative log-likelihood of
the answer tokens divided by their count (a micro-average, so long answers
weigh by their length, as in training).

Where the answers start with a yes/no/maybe decision (`data.decision_column`),
the same forward pass also reads the decision: the most likely of the three
words ("Yes", "No", "Maybe") as the answer's first token, right after the
prompt. It is compared with the true decision: the decision accuracy.
"""

from __future__ import annotations

import collections
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from ml.data import DECISIONS, QAExample
from ml.promotion import RowScore
from ml.prompt import IGNORE_INDEX, Encoded, PromptFormat, encode_all, render

if TYPE_CHECKING:
    from transformers import PreTrainedModel as Model
    from transformers import PreTrainedTokenizerBase as Tokenizer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LossResult:
    loss: float
    tokens: int
    examples: int
    decision_accuracy: float | None = None  # share of `decisions` rows whose first answer word was right
    decisions: int = 0
    nll: list[float] | None = None  # per input row, summed over its answer tokens (nan: no answer token left)
    row_tokens: list[int] | None = None
    row_right: list[int | None] | None = None  # per input row: 1/0 its decision read right, None: not read
    rows: list[RowScore] | None = None  # the same by row key, with the scored answer's bytes (evaluate_model)

    @property
    def perplexity(self) -> float:
        return math.exp(min(self.loss, 50.0))


def decision_token_ids(tokenizer: Tokenizer) -> list[int]:
    """The first token of each decision word as an answer starts ("Yes. ..."), in DECISIONS order."""
    ids = [tokenizer(f"{d.capitalize()}.", add_special_tokens=False)["input_ids"][0] for d in DECISIONS]
    if len(set(ids)) < len(ids):
        raise ValueError(f"the tokenizer starts two decision words with the same token ({ids}); "
                         "their accuracy cannot be read from the first answer token")
    return ids


def token_loss(model: Model, encoded: Sequence[Encoded], pad_token_id: int, batch_size: int = 8,
               decisions: Sequence[int | None] = (), decision_ids: Sequence[int] = ()) -> LossResult:
    """Loss per answer token; with `decisions` (per row: the index of its true decision in
    `decision_ids`, or None), also the share of rows whose most likely first answer token is it."""
    golds = list(decisions) or [None] * len(encoded)
    rows = [(i, e, g) for i, (e, g) in enumerate(zip(encoded, golds, strict=True))
            if any(t != IGNORE_INDEX for t in e.labels)]
    rows.sort(key=lambda row: len(row[1].input_ids))  # batches of similar lengths: less padding to compute
    if not rows:
        raise ValueError("no example has answer tokens left after truncation; raise model.max_seq_length")
    dev = next(model.parameters()).device
    row_nll: list[float | None] = [None] * len(encoded)
    row_tokens = [0] * len(encoded)
    row_right: list[int | None] = [None] * len(encoded)
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            batch = [e for _, e, _ in rows[start:start + batch_size]]
            width = max(len(e.input_ids) for e in batch)
            ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
            labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for i, e in enumerate(batch):
                ids[i, :len(e.input_ids)] = torch.tensor(e.input_ids)
                labels[i, :len(e.labels)] = torch.tensor(e.labels)
                mask[i, :len(e.input_ids)] = 1
            logits = model(input_ids=ids.to(dev), attention_mask=mask.to(dev)).logits.float()
            # token t predicts token t+1
            nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)),
                                  labels[:, 1:].reshape(-1).to(dev), ignore_index=IGNORE_INDEX,
                                  reduction="none").view(len(batch), width - 1).sum(dim=1).tolist()
            counts = (labels[:, 1:] != IGNORE_INDEX).sum(dim=1).tolist()
            for i, (index, e, gold) in enumerate(rows[start:start + batch_size]):
                row_nll[index], row_tokens[index] = float(nll[i]), int(counts[i])
                if gold is not None:  # the logits just before the first answer token predict it
                    first = next(t for t, label in enumerate(e.labels) if label != IGNORE_INDEX)
                    row_right[index] = int(int(logits[i, first - 1, list(decision_ids)].argmax()) == gold)
    total_nll, total_tokens = sum(x for x in row_nll if x is not None), sum(row_tokens)
    judged = [r for r in row_right if r is not None]
    return LossResult(total_nll / total_tokens, total_tokens, len(rows), sum(judged) / len(judged) if judged else None,
                      len(judged), [x if x is not None else float("nan") for x in row_nll], row_tokens, row_right)


def row_scores(tokenizer: Tokenizer, examples: Sequence[QAExample], encoded: Sequence[Encoded],
               result: LossResult) -> list[RowScore]:
    """Per test row: its answer NLL and token count under this model, the UTF-8 bytes of the answer
    text that was scored (what truncation left of it), for a tokenizer-free comparison, and whether
    its decision was read right (where it was read)."""
    assert result.nll is not None and result.row_tokens is not None
    right = result.row_right or [None] * len(examples)
    out = []
    for ex, enc, nll, n, r in zip(examples, encoded, result.nll, result.row_tokens, right, strict=True):
        if n:
            text = tokenizer.decode([t for t in enc.labels if t != IGNORE_INDEX], skip_special_tokens=True)
            out.append(RowScore(ex.key, nll, n, len(text.encode("utf-8")), r))
    return out


def evaluate_model(model: Model, tokenizer: Tokenizer, examples: Sequence[QAExample], fmt: PromptFormat,
                   batch_size: int) -> LossResult:
    """The model's loss on `examples`, with each row's score by key."""
    encoded = encode_all(tokenizer, examples, fmt)
    golds = [DECISIONS.index(ex.decision) if fmt.lead_with_decision and ex.decision in DECISIONS else None
             for ex in examples]
    if not any(g is not None for g in golds):
        result = token_loss(model, encoded, tokenizer.pad_token_id, batch_size)
    else:
        result = token_loss(model, encoded, tokenizer.pad_token_id, batch_size, golds, decision_token_ids(tokenizer))
    return replace(result, nll=None, row_tokens=None, row_right=None,
                   rows=row_scores(tokenizer, examples, encoded, result))


def sample_rows(tokenizer: Tokenizer, examples: Sequence[QAExample], fmt: PromptFormat, n: int,
                max_new_tokens: int) -> list[QAExample]:
    """The first `n` examples whose prompt leaves room for a `max_new_tokens` answer within
    `fmt.max_length` tokens: the model never trained on a longer sequence (and Unsloth's fast
    generation cuts a longer prompt, not its attention mask)."""
    rows: list[QAExample] = []
    for ex in examples:
        if len(rows) == n:
            break
        prompt, _ = render(tokenizer, fmt, ex.question, ex.contexts)
        if len(tokenizer(prompt, add_special_tokens=False)["input_ids"]) + max_new_tokens <= fmt.max_length:
            rows.append(ex)
    return rows


def generate_answers(model: Model, tokenizer: Tokenizer, examples: Sequence[QAExample], fmt: PromptFormat,
                     max_new_tokens: int, batch_size: int = 8) -> list[str]:
    """Greedy answers (`generate`'s texts)."""
    return [text for text, _ in generate(model, tokenizer, examples, fmt, max_new_tokens, batch_size)]


def generate(model: Model, tokenizer: Tokenizer, examples: Sequence[QAExample], fmt: PromptFormat,
             max_new_tokens: int, batch_size: int = 8) -> list[tuple[str, bool]]:
    """Greedy answers and whether each stopped (ended with an end-of-sequence token within
    `max_new_tokens`), from `greedy_ids`."""
    ends = end_ids(model, tokenizer)
    return [(tokenizer.decode(ids, skip_special_tokens=True).strip(), bool(ids) and ids[-1] in ends)
            for ids in greedy_ids(model, tokenizer, examples, fmt, max_new_tokens, batch_size)]


def end_ids(model: Model, tokenizer: Tokenizer) -> set[int]:
    """The token ids that end an answer: the model's generation config's and the tokenizer's."""
    ends = model.generation_config.eos_token_id
    return (set(ends if isinstance(ends, list) else [ends]) | {tokenizer.eos_token_id}) - {None}


def greedy_ids(model: Model, tokenizer: Tokenizer, examples: Sequence[QAExample], fmt: PromptFormat,
               max_new_tokens: int, batch_size: int = 8) -> list[list[int]]:
    """The token ids of each example's greedy answer, up to and with its first end token (`end_ids`;
    the padding after it dropped), `batch_size` prompts at a time, each batch padded on the left so
    that every answer starts right after its prompt (the attention mask hides the padding). One
    decoding loop per batch instead of one per prompt: the report's sample answers of an 8B model take
    seconds, not tens of seconds; a long request to the pyfunc stays within memory."""
    dev, ends = next(model.parameters()).device, end_ids(model, tokenizer)
    answers: list[list[int]] = []
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        for start in range(0, len(examples), batch_size):
            prompts = [render(tokenizer, fmt, ex.question, ex.contexts)[0] for ex in examples[start:start + batch_size]]
            ids = tokenizer(prompts, add_special_tokens=False, padding=True, return_tensors="pt").to(dev)
            with torch.no_grad():
                # use_cache: a model fresh from training with gradient checkpointing has it off in its config
                out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                                     pad_token_id=tokenizer.pad_token_id)
            width = ids["input_ids"].shape[1]  # what follows is the answer; one that ended early is padded
            for row in out.tolist():
                answer = row[width:]
                end = next((i for i, t in enumerate(answer) if t in ends), None)
                answers.append(answer if end is None else answer[:end + 1])
    finally:
        tokenizer.padding_side = side
    return answers


# An answer is judged for never stopping only where its reference answer takes at most 1/ENDS_WITHIN
# of the token budget: a budget shorter than a right answer would count writing it as rambling.
ENDS_WITHIN = 1.5


def degenerate(answer: str, stopped: bool, budget_fits: bool = True) -> str | None:
    """Why a greedy answer is degenerate, or None: empty, never stopped (no end of sequence within a
    token budget that `budget_fits` the right answer with room to spare), or repeating itself (a run
    of three words that comes back three times or more)."""
    if not answer.strip():
        return "empty"
    if not stopped and budget_fits:
        return "never stopped"
    words = answer.split()
    runs = collections.Counter(tuple(words[i:i + 3]) for i in range(len(words) - 2))
    if runs and max(runs.values()) >= 3:
        return "repeats itself"
    return None
