"""Alpaca-style prompts, rendered through the model's chat template when it has one.

Training, evaluation and serving all build their token ids here, so the loss
the trainer optimises, the loss the evaluator compares and the prompt the
served model sees are the same thing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ml.data import QAExample

IGNORE_INDEX = -100

ALPACA_TEMPLATE = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)


def user_input(question: str, contexts: Sequence[str]) -> str:
    """The Alpaca "input": the question followed by its research contexts."""
    ctx = "\n".join(f"- {c.strip()}" for c in contexts if c.strip())
    return f"질문: {question.strip()}\n\n연구 내용:\n{ctx}" if ctx else f"질문: {question.strip()}"


def _uses_chat(tokenizer: Any, use_chat_template: bool) -> bool:
    return bool(use_chat_template and getattr(tokenizer, "chat_template", None))


def render(tokenizer: Any, instruction: str, question: str, contexts: Sequence[str],
           answer: str | None = None, use_chat_template: bool = True) -> tuple[str, str]:
    """(prompt text, completion text). The completion carries the end-of-turn/EOS marker."""
    body = user_input(question, contexts)
    if _uses_chat(tokenizer, use_chat_template):
        messages = [{"role": "user", "content": f"{instruction}\n\n{body}"}]
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if answer is None:
            return prompt, ""
        full = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": answer}],
                                             tokenize=False)
        if not full.startswith(prompt):
            raise ValueError("the chat template renders the prompt differently with an answer; "
                             "set model.use_chat_template: false for this model")
        return prompt, full[len(prompt):]
    prompt = (tokenizer.bos_token or "") + ALPACA_TEMPLATE.format(instruction=instruction, input=body)
    return prompt, "" if answer is None else answer + (tokenizer.eos_token or "")


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX on prompt tokens: completion-only loss
    full_length: int  # before truncation; > max_length means the answer was cut

    @property
    def truncated(self) -> bool:
        return self.full_length > len(self.input_ids)


def encode(tokenizer: Any, example: QAExample, instruction: str, max_length: int,
           use_chat_template: bool = True) -> Encoded:
    prompt, completion = render(tokenizer, instruction, example.question, example.contexts,
                                example.answer, use_chat_template)
    # Tokenised separately so the prompt ids are exactly what generation sees;
    # special tokens are already in the text.
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    ids = prompt_ids + completion_ids
    labels = [IGNORE_INDEX] * len(prompt_ids) + completion_ids
    return Encoded(ids[:max_length], labels[:max_length], len(ids))


def encode_all(tokenizer: Any, examples: Sequence[QAExample], instruction: str, max_length: int,
               use_chat_template: bool = True) -> list[Encoded]:
    return [encode(tokenizer, ex, instruction, max_length, use_chat_template) for ex in examples]
