from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from ml.config import DEFAULT_INSTRUCTION, load_config
from ml.data import QAExample
from ml.prompt import IGNORE_INDEX, PromptFormat, encode, render, token_lengths, user_input

EX = QAExample("k1", "비타민 D 보충은 골절을 줄이는가?", ("첫째 맥락 문단.", "둘째 맥락 문단."), "골절 위험이 줄었다.")
KO = PromptFormat(max_length=4096)
ALPACA = PromptFormat(use_chat_template=False, max_length=4096)


@pytest.fixture(scope="module")
def tokenizer(tiny_model: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model))


def test_user_input_holds_question_and_every_context() -> None:
    text = user_input(EX.question, EX.contexts)
    assert text.startswith("질문: " + EX.question) and "연구 내용:" in text
    assert all(c in text for c in EX.contexts)


def test_labels_follow_the_profile_language() -> None:
    fmt = PromptFormat.from_config(load_config("pubmedqa-en"))
    text = user_input("Does X help?", ["Context one."], fmt)
    assert text == "Question: Does X help?\n\nContexts:\n- Context one."
    assert fmt.max_length == 2048 and fmt.instruction.startswith("Answer")


def test_chat_template_prompt_and_completion(tokenizer: Any) -> None:
    prompt, completion = render(tokenizer, KO, EX.question, EX.contexts, EX.answer)
    assert prompt.startswith("<|begin_of_text|><|start_header_id|>user")
    assert prompt.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert DEFAULT_INSTRUCTION in prompt and EX.question in prompt
    assert completion == EX.answer + "<|eot_id|>"


def test_alpaca_fallback_without_chat_template(tokenizer: Any) -> None:
    prompt, completion = render(tokenizer, ALPACA, EX.question, EX.contexts, EX.answer)
    assert prompt.startswith(tokenizer.bos_token)
    assert "### Instruction:\n" + DEFAULT_INSTRUCTION in prompt
    assert prompt.endswith("### Response:\n") and "### Input:\n질문: " in prompt
    assert completion == EX.answer + tokenizer.eos_token


@pytest.mark.parametrize("fmt", [KO, ALPACA], ids=["chat", "alpaca"])
def test_completion_only_labels(tokenizer: Any, fmt: PromptFormat) -> None:
    enc = encode(tokenizer, EX, fmt)
    prompt, _ = render(tokenizer, fmt, EX.question, EX.contexts)
    n_prompt = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    assert enc.labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    answer_ids = [t for t in enc.labels if t != IGNORE_INDEX]
    assert answer_ids == enc.input_ids[n_prompt:]
    assert tokenizer.decode(answer_ids) == EX.answer + tokenizer.eos_token
    assert not enc.truncated and enc.full_length == len(enc.input_ids)
    assert enc.input_ids.count(tokenizer.bos_token_id) == 1  # no doubled BOS


def test_truncation_is_reported(tokenizer: Any) -> None:
    enc = encode(tokenizer, EX, PromptFormat(max_length=20))
    assert len(enc.input_ids) == len(enc.labels) == 20
    assert enc.truncated and enc.full_length > 20


@pytest.mark.parametrize("fmt", [KO, ALPACA, PromptFormat(max_length=20)], ids=["chat", "alpaca", "short"])
def test_batched_token_lengths_equal_the_encoders(tokenizer: Any, fmt: PromptFormat) -> None:
    # The gate's fit check counts with token_lengths; training truncates with encode: they must agree.
    other = QAExample("k2", "짧은 질문?", (), "짧은 답.")
    assert token_lengths(tokenizer, [EX, other], fmt) == [encode(tokenizer, e, fmt).full_length for e in (EX, other)]
