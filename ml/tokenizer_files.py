"""A base model's tokenizer read from its files alone, for the data-quality gate's fit check.

The gate counts tokens before any GPU time; `transformers.AutoTokenizer` would import the model
stack for it (seconds per process, docs/benchmarks.md). The counts need only three files of the
model: `tokenizer.json` (the `tokenizers` encoder transformers' fast tokenizers run), the chat
template (`chat_template.jinja`, or `chat_template` in `tokenizer_config.json`) and the special
tokens, rendered by transformers' own template renderer. Token counts equal AutoTokenizer's
(tests/test_validate.py). A checkpoint converted on load (EXAONE, ml/base_models.py) keeps these
files unchanged, so they are read from the checkpoint as published.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from huggingface_hub import hf_hub_download
from huggingface_hub.errors import EntryNotFoundError
from tokenizers import Tokenizer
from transformers.utils.chat_template_utils import render_jinja_template

from ml.config import ModelConfig, resolve_path
from ml.errors import ModelLoadError

SPECIAL = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class TokenizerFiles:
    """The part of a transformers tokenizer that `ml.prompt.render` and `token_lengths` use."""

    def __init__(self, backend: Tokenizer, chat_template: str | None, special: dict[str, str]) -> None:
        self.backend_tokenizer = backend
        self.chat_template = chat_template
        self.special_tokens_map = special

    @property
    def bos_token(self) -> str | None:
        return self.special_tokens_map.get("bos_token")

    @property
    def eos_token(self) -> str | None:
        return self.special_tokens_map.get("eos_token")

    def apply_chat_template(self, messages: list[dict[str, str]], tokenize: bool = False,
                            add_generation_prompt: bool = False) -> str:
        assert not tokenize and self.chat_template is not None
        rendered, _ = render_jinja_template(conversations=[messages], chat_template=self.chat_template,
                                            add_generation_prompt=add_generation_prompt, **self.special_tokens_map)
        return str(rendered[0])

    def __call__(self, texts: list[str], add_special_tokens: bool = False) -> dict[str, list[list[int]]]:
        encoded = self.backend_tokenizer.encode_batch(texts, add_special_tokens=add_special_tokens)
        return {"input_ids": [e.ids for e in encoded]}


def _token(value: Any) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


def tokenizer_files(cfg: ModelConfig) -> TokenizerFiles:
    """The configured base model's tokenizer, from a local folder or the hub (`model.revision`)."""
    folder = resolve_path(cfg.base_model)

    def read(name: str) -> str | None:
        if folder.is_dir():
            path: Path | None = folder / name if (folder / name).exists() else None
        else:
            try:
                path = Path(hf_hub_download(cfg.base_model, name, revision=cfg.revision))
            except EntryNotFoundError:  # not in the repository (or, offline, not in the local cache)
                path = None
            except Exception as exc:  # offline, no such repository: name the model
                raise ModelLoadError(f"cannot read {name} of {cfg.base_model!r}: {exc}") from exc
        return path.read_text(encoding="utf-8") if path else None

    encoder = read("tokenizer.json")
    if encoder is None:
        raise ModelLoadError(f"{cfg.base_model!r} has no tokenizer.json (or, offline, none in the local cache): "
                             "the fit check needs a fast tokenizer's file (or set validation.check_fit: false)")
    config = json.loads(read("tokenizer_config.json") or "{}")
    special_map = json.loads(read("special_tokens_map.json") or "{}")
    special = {k: t for k in SPECIAL if (t := _token(config.get(k)) or _token(special_map.get(k)))}
    if "pad_token" not in special and "eos_token" in special:  # as ml.modeling.load_tokenizer does
        special["pad_token"] = special["eos_token"]
    template = read("chat_template.jinja") or config.get("chat_template")
    if isinstance(template, list):  # several named templates: the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    return TokenizerFiles(Tokenizer.from_str(encoder), template, special)
