"""A base model's tokenizer read from its files alone, for the data-quality gate's fit check.

The gate counts tokens before any GPU time; `transformers.AutoTokenizer` would import the model
stack for it (seconds per process, docs/benchmarks.md). The counts need only three files of the
model: `tokenizer.json` (the `tokenizers` encoder transformers' fast tokenizers run), the chat
template (`chat_template.jinja`, or `chat_template` in `tokenizer_config.json`) and the special
tokens, rendered in the Jinja environment transformers renders chat templates in (not imported:
transformers' import alone scans every installed package's file list, a second per process on a
CUDA machine). Prompts and token counts equal AutoTokenizer's (tests/test_validate.py). A
checkpoint converted on load (EXAONE, ml/base_models.py) keeps these files unchanged, so they are
read from the checkpoint as published.
"""

from __future__ import annotations

import functools
import json
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import EntryNotFoundError
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from ml.config import ModelConfig, resolve_path
from ml.errors import ModelLoadError
from ml.hub import offline_note, use_hub

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
        return compile_chat_template(self.chat_template).render(
            messages=messages, tools=None, documents=None, add_generation_prompt=add_generation_prompt,
            **self.special_tokens_map)

    def __call__(self, texts: list[str], add_special_tokens: bool = False) -> dict[str, list[list[int]]]:
        encoded = self.backend_tokenizer.encode_batch(texts, add_special_tokens=add_special_tokens)
        return {"input_ids": [e.ids for e in encoded]}


class _Generation(Extension):
    """`{% generation %}...{% endgeneration %}`, which marks the assistant's part in some templates:
    rendered as its body (transformers tracks its position only when asked for an assistant mask)."""

    tags = {"generation"}

    def parse(self, parser: Any) -> Any:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Any) -> str:
        return str(caller())


def _raise(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@functools.cache
def compile_chat_template(template: str) -> jinja2.Template:
    """A chat template in transformers' environment (`transformers.utils.chat_template_utils`): sandboxed,
    blocks trimmed, loop controls, `tojson` without HTML escaping, `raise_exception`, `strftime_now`."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


def _token(value: Any) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


def tokenizer_files(cfg: ModelConfig) -> TokenizerFiles:
    """The configured base model's tokenizer, from a local folder or the hub (`model.revision`)."""
    folder = resolve_path(cfg.base_model)

    def read(name: str) -> str | None:
        if folder.is_dir():
            path: Path | None = folder / name if (folder / name).exists() else None
        else:
            use_hub()  # an unreachable hub: the local cache answers at once, not after retries
            try:
                path = Path(hf_hub_download(cfg.base_model, name, revision=cfg.revision))
            except EntryNotFoundError:  # not in the repository (or, offline, not in the local cache)
                path = None
            except Exception as exc:  # offline, no such repository: name the model
                raise ModelLoadError(f"cannot read {name} of {cfg.base_model!r}: {exc}{offline_note()}") from exc
        return path.read_text(encoding="utf-8") if path else None

    encoder = read("tokenizer.json")
    if encoder is None:
        offline = "" if folder.is_dir() else offline_note()
        raise ModelLoadError(f"{cfg.base_model!r} has no tokenizer.json{offline}: the fit check needs a fast "
                             "tokenizer's file (or set validation.check_fit: false)")
    config = json.loads(read("tokenizer_config.json") or "{}")
    special_map = json.loads(read("special_tokens_map.json") or "{}")
    special = {k: t for k in SPECIAL if (t := _token(config.get(k)) or _token(special_map.get(k)))}
    if "pad_token" not in special and "eos_token" in special:  # as ml.modeling.load_tokenizer does
        special["pad_token"] = special["eos_token"]
    template = read("chat_template.jinja") or config.get("chat_template")
    if isinstance(template, list):  # several named templates: the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    return TokenizerFiles(Tokenizer.from_str(encoder), template, special)
