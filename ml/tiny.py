"""A tiny Llama-architecture model with a tokenizer trained on the data.

The hub is out of reach on CI and laptops without credentials, so the demo and
the tests build a real `LlamaForCausalLM` (random weights, same module names as
Llama-3.1, so LoRA targets match) and a byte-level BPE tokenizer with a
Llama-3-style chat template, then load it through the same `from_pretrained`
code the production model uses.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from ml.data import QAExample
from ml.prompt import ALPACA_TEMPLATE, PromptFormat, user_input

log = logging.getLogger(__name__)

SPECIAL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                  "<|end_header_id|>", "<|eot_id|>", "<|pad|>"]

# Llama-3's template, without the system preamble.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n{{ message['content'] | trim }}<|eot_id|>"
    "{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


def _corpus(examples: Iterable[QAExample], fmt: PromptFormat) -> Iterable[str]:
    yield ALPACA_TEMPLATE
    yield fmt.instruction
    for ex in examples:
        yield user_input(ex.question, ex.contexts, fmt)
        yield ex.answer


def build_tiny_model(examples: list[QAExample], out_dir: Path, fmt: PromptFormat, *,
                     vocab_size: int = 2048, hidden_size: int = 64, num_layers: int = 2,
                     seed: int = 0) -> Path:
    """Write tokenizer + randomly initialised Llama to `out_dir` (idempotent for the same inputs)."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(_corpus(examples, fmt), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
        pad_token="<|pad|>", model_max_length=4096)
    tokenizer.chat_template = CHAT_TEMPLATE

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=1024, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id

    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out_dir)
    model.save_pretrained(out_dir)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("tiny Llama with %s parameters and a %d-token vocabulary written to %s",
             f"{n_params:,}", len(tokenizer), out_dir)
    return out_dir
