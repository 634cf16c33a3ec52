"""Alpaca-style prompts, rendered through the model's chat template when it has one.

Training, evaluation and serving all build their token ids here, so the loss
the trainer optimises, the loss the evaluator compares and the prompt the
served model sees are the same thing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from ml.config import DEFAULT_INSTRUCTION, PipelineConfig
from ml.data import QAExample

IGNORE_INDEX = -100

ALPACA_TEMPLATE = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)


@dataclass(frozen=True)
class PromptFormat:
    """Everything that decides the token ids of an example; travels with the registered model."""

    instruction: str = DEFAULT_INSTRUCTION
    question_label: str = "질문"
    contexts_label: str = "연구 내용"
    use_chat_template: bool = True
    max_length: int = 512
    lead_with_decision: bool = False  # each answer starts with its yes/no/maybe decision

    @classmethod
    def from_config(cls, cfg: PipelineConfig) -> PromptFormat:
        return cls(cfg.data.instruction, cfg.data.question_label, cfg.data.contexts_label,
                   cfg.model.use_chat_template, cfg.model.max_seq_length, cfg.data.lead_with_decision)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def user_input(question: str, contexts: Sequence[str], fmt: PromptFormat = PromptFormat()) -> str:
    """The Alpaca "input": the question followed by its research contexts."""
    ctx = "\n".join(f"- {c.strip()}" for c in contexts if c.strip())
    head = f"{fmt.question_label}: {question.strip()}"
    return f"{head}\n\n{fmt.contexts_label}:\n{ctx}" if ctx else head


def render(tokenizer: Any, fmt: PromptFormat, question: str, contexts: Sequence[str],
           answer: str | None = None) -> tuple[str, str]:
    """(prompt text, completion text). The completion carries the end-of-turn/EOS marker."""
    body = user_input(question, contexts, fmt)
    if fmt.use_chat_template and getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": f"{fmt.instruction}\n\n{body}"}]
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if answer is None:
            return prompt, ""
        full = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": answer}],
                                             tokenize=False)
        if not full.startswith(prompt):
            raise ValueError("the chat template renders the prompt differently with an answer; "
                             "set model.use_chat_template: false for this model")
        return prompt, full[len(prompt):]
    prompt = (tokenizer.bos_token or "") + ALPACA_TEMPLATE.format(instruction=fmt.instruction, input=body)
    return prompt, "" if answer is None else answer + (tokenizer.eos_token or "")


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX on prompt tokens: completion-only loss
    full_length: int  # before truncation; > max_length means the answer was cut

    @property
    def truncated(self) -> bool:
        return self.full_length > len(self.input_ids)


def encode(tokenizer: Any, example: QAExample, fmt: PromptFormat) -> Encoded:
    prompt, completion = render(tokenizer, fmt, example.question, example.contexts,
                                example.target(fmt.lead_with_decision))
    # Tokenised separately so the prompt ids are exactly what generation sees;
    # special tokens are already in the text.
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    ids = prompt_ids + completion_ids
    labels = [IGNORE_INDEX] * len(prompt_ids) + completion_ids
    return Encoded(ids[:fmt.max_length], labels[:fmt.max_length], len(ids))


def token_lengths(tokenizer: Any, examples: Sequence[QAExample], fmt: PromptFormat) -> list[int]:
    """Untruncated length (prompt + answer) of each example: `encode(...).full_length`, batched."""
    if not examples:
        return []
    pairs = [render(tokenizer, fmt, ex.question, ex.contexts, ex.target(fmt.lead_with_decision)) for ex in examples]
    prompts, answers = [p for p, _ in pairs], [c for _, c in pairs]
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "encode_batch_fast"):
        # Lengths only: the Rust tokenizer without offsets or Python id lists is faster (docs/benchmarks.md).
        count = lambda texts: [len(e) for e in backend.encode_batch_fast(texts, add_special_tokens=False)]  # noqa: E731
    else:
        count = lambda texts: [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]  # noqa: E731
    return [p + c for p, c in zip(count(prompts), count(answers), strict=True)]


def encode_all(tokenizer: Any, examples: Sequence[QAExample], fmt: PromptFormat) -> list[Encoded]:
    return [encode(tokenizer, ex, fmt) for ex in examples]
