"""Loading base models, tokenizers and adapters (hub ids or local folders)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from ml.config import ModelConfig, resolve_path

log = logging.getLogger(__name__)


class ModelLoadError(RuntimeError):
    pass


def model_ref(name: str) -> str:
    """A local folder (relative to the project root) or a hub id, as given."""
    local = resolve_path(name)
    return str(local) if local.exists() else name


def compute_dtype() -> Any:
    import torch

    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def quiet_progress_bars() -> None:
    """Per-file progress bars flood task logs; our own log lines report progress instead."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def load_tokenizer(cfg: ModelConfig, path: str | None = None) -> Any:
    from transformers import AutoTokenizer

    quiet_progress_bars()
    ref = path or model_ref(cfg.base_model)
    try:
        tok = AutoTokenizer.from_pretrained(ref, revision=None if path else cfg.revision)
    except OSError as exc:
        raise ModelLoadError(f"cannot load tokenizer {ref!r}: {exc}") from exc
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_base_model(cfg: ModelConfig) -> Any:
    """The base model on the best device; 4-bit NF4 on CUDA when configured."""
    import torch
    from transformers import AutoModelForCausalLM

    ref = model_ref(cfg.base_model)
    kwargs: dict[str, Any] = {"revision": cfg.revision, "dtype": compute_dtype()}
    if torch.cuda.is_available():
        kwargs["device_map"] = {"": 0}
        if cfg.load_in_4bit:
            from transformers import BitsAndBytesConfig

            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=compute_dtype())
    log.info("loading base model %s (%s)", ref, ", ".join(f"{k}={v}" for k, v in kwargs.items()
                                                          if k != "quantization_config"))
    try:
        return AutoModelForCausalLM.from_pretrained(ref, **kwargs)
    except OSError as exc:
        raise ModelLoadError(f"cannot load base model {ref!r}: {exc}") from exc


def load_with_adapter(cfg: ModelConfig, adapter_dir: Path | None) -> tuple[Any, Any]:
    """(model, tokenizer) for evaluation or serving; the adapter's own tokenizer wins."""
    model = load_base_model(cfg)
    tokenizer = load_tokenizer(cfg, str(adapter_dir) if adapter_dir else None)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir))
    model.eval()
    return model, tokenizer
