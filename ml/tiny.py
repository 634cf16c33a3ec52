"""A tiny Llama-architecture model with a tokenizer trained on the data; random checkpoints in
EXAONE-3.5's published layout, tiny for the tests and full-size for the GPU benchmark.

The hub is out of reach on CI and laptops without credentials, so the demo and
the tests build a real `LlamaForCausalLM` (random weights, same module names as
Llama-3.1, so LoRA targets match) and a byte-level BPE tokenizer with a
Llama-3-style chat template, then load it through the same `from_pretrained`
code the production model uses.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

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


@dataclass(frozen=True)
class ExaoneShape:
    """The sizes in an EXAONE-3.5 `config.json` (its own key names in the comments)."""
    hidden: int  # hidden_size
    layers: int  # num_layers
    heads: int  # num_attention_heads
    kv_heads: int  # num_key_value_heads
    head_dim: int  # head_dim
    ffn: int  # intermediate_size
    max_positions: int  # max_position_embeddings
    rope_scaling: dict[str, Any] | None  # rope_scaling (llama3-style)
    vocab: int | None = None  # vocab_size; None: the tokenizer's


# LGAI-EXAONE/EXAONE-3.5-2.4B-Instruct's config.json
EXAONE_35_2_4B = ExaoneShape(
    hidden=2560, layers=30, heads=32, kv_heads=8, head_dim=80, ffn=7168, max_positions=32768, vocab=102400,
    rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192})


def exaone_checkpoint(folder: Path, tokenizer_from: Path, shape: ExaoneShape, *, seed: int = 0,
                      dtype: torch.dtype = torch.float32, device: str = "cpu", std: float = 0.05) -> Path:
    """A random model in EXAONE-3.5's published layout (config keys, weight names, tied head,
    remote-code stub) with the tokenizer of `tokenizer_from`."""
    tok = AutoTokenizer.from_pretrained(tokenizer_from)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(folder)
    vocab = shape.vocab or len(tok)
    config = {"architectures": ["ExaoneForCausalLM"], "model_type": "exaone",
              "auto_map": {"AutoConfig": "configuration_exaone.ExaoneConfig",
                           "AutoModelForCausalLM": "modeling_exaone.ExaoneForCausalLM"},
              "vocab_size": vocab, "hidden_size": shape.hidden, "intermediate_size": shape.ffn,
              "num_layers": shape.layers, "num_attention_heads": shape.heads, "num_key_value_heads": shape.kv_heads,
              "head_dim": shape.head_dim, "activation_function": "silu", "layer_norm_epsilon": 1e-5,
              "max_position_embeddings": shape.max_positions, "rope_theta": 1000000.0,
              "rope_scaling": shape.rope_scaling, "tie_word_embeddings": True, "bos_token_id": tok.bos_token_id,
              "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id,
              "torch_dtype": str(dtype).removeprefix("torch.")}
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    # the published checkpoints carry their modelling code; loading must never run it
    (folder / "modeling_exaone.py").write_text("raise RuntimeError('remote code must not run')\n")
    g = torch.Generator(device=device).manual_seed(seed)

    def w(*dims: int, offset: float = 0.0) -> torch.Tensor:
        return (torch.randn(*dims, generator=g, device=device, dtype=dtype) * std + offset).cpu()

    h, q, kv = shape.hidden, shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    weights = {"transformer.wte.weight": w(vocab, h), "transformer.ln_f.weight": w(h, offset=1.0)}
    for i in range(shape.layers):
        p = f"transformer.h.{i}."
        weights.update({
            p + "ln_1.weight": w(h, offset=1.0), p + "ln_2.weight": w(h, offset=1.0),
            p + "attn.attention.q_proj.weight": w(q, h), p + "attn.attention.k_proj.weight": w(kv, h),
            p + "attn.attention.v_proj.weight": w(kv, h), p + "attn.attention.out_proj.weight": w(h, q),
            p + "mlp.c_fc_0.weight": w(shape.ffn, h), p + "mlp.c_fc_1.weight": w(shape.ffn, h),
            p + "mlp.c_proj.weight": w(h, shape.ffn)})
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    log.info("random EXAONE-3.5-layout checkpoint with %s parameters written to %s",
             f"{sum(t.numel() for t in weights.values()):,}", folder)
    return folder
