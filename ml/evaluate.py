"""Held-out loss per answer token, computed the same way for every model.

The challenger, the champion and the bare base model are all scored by
`token_loss` on the same encoded test split: summed negative log-likelihood of
the answer tokens divided by their count (a micro-average, so long answers
weigh by their length, as in training).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ml.data import QAExample
from ml.prompt import IGNORE_INDEX, Encoded, PromptFormat, encode_all, render

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LossResult:
    loss: float
    tokens: int
    examples: int

    @property
    def perplexity(self) -> float:
        return math.exp(min(self.loss, 50.0))


def token_loss(model: Any, encoded: Sequence[Encoded], pad_token_id: int, batch_size: int = 8) -> LossResult:
    rows = [e for e in encoded if any(t != IGNORE_INDEX for t in e.labels)]
    if not rows:
        raise ValueError("no example has answer tokens left after truncation; raise model.max_seq_length")
    dev = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            batch = rows[start:start + batch_size]
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
                                  reduction="sum")
            total_nll += float(nll)
            total_tokens += int((labels[:, 1:] != IGNORE_INDEX).sum())
    return LossResult(total_nll / total_tokens, total_tokens, len(rows))


def evaluate_model(model: Any, tokenizer: Any, examples: Sequence[QAExample], fmt: PromptFormat,
                   batch_size: int) -> LossResult:
    encoded = encode_all(tokenizer, examples, fmt)
    return token_loss(model, encoded, tokenizer.pad_token_id, batch_size)


def generate_answers(model: Any, tokenizer: Any, examples: Sequence[QAExample], fmt: PromptFormat,
                     max_new_tokens: int) -> list[str]:
    """Greedy answers, one prompt at a time (no padding side effects; a handful of samples)."""
    dev = next(model.parameters()).device
    answers = []
    for ex in examples:
        prompt, _ = render(tokenizer, fmt, ex.question, ex.contexts)
        ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").to(dev)
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
        answers.append(tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip())
    return answers
