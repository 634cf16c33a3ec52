"""Loading base models, tokenizers and adapters (hub ids or local folders), for training and scoring."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from peft import LoraConfig, PeftModel, prepare_model_for_kbit_training, set_peft_model_state_dict
from peft.utils import load_peft_weights
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from ml.base_models import quiet_progress_bars, resolve
from ml.config import ModelConfig, PipelineConfig
from ml.distributed import local_rank
from ml.errors import ModelLoadError

if TYPE_CHECKING:
    from transformers import PreTrainedModel as Model
    from transformers import PreTrainedTokenizerBase as Tokenizer

log = logging.getLogger(__name__)


def model_ref(cfg: ModelConfig) -> str:
    """The folder or hub id that loads the configured base model (ml/base_models.py)."""
    return resolve(cfg.base_model, cfg.revision)


def compute_dtype(cfg: ModelConfig) -> Any:
    cuda = torch.cuda.is_available()
    if cfg.dtype != "auto":
        if cfg.dtype == "bfloat16" and not cuda and not cpu_has_bf16():
            log.warning("model.dtype=bfloat16 on a CPU without bf16 instructions: matrix products take a "
                        "slow generic path (minutes per step); model.dtype=auto picks float32 here")
        return getattr(torch, cfg.dtype)
    if cuda:
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_bf16() else torch.float32


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 matrices in hardware (AVX512-BF16 or AMX): there bfloat16
    is faster than float32; elsewhere it is far slower."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:  # not Linux: float32
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def load_tokenizer(cfg: ModelConfig, path: str | None = None) -> Tokenizer:
    quiet_progress_bars()
    ref = path or model_ref(cfg)
    try:
        # never run a checkpoint's own code, and never ask about it on stdin (nobody answers there)
        tok = AutoTokenizer.from_pretrained(ref, revision=None if path else cfg.revision, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load tokenizer {ref!r}: {exc}") from exc
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_base_model(cfg: ModelConfig) -> Model:
    """The base model on the best device; 4-bit NF4 on CUDA when configured."""
    ref = model_ref(cfg)
    kwargs: dict[str, Any] = {"revision": cfg.revision, "dtype": compute_dtype(cfg), "trust_remote_code": False}
    if torch.cuda.is_available():
        kwargs["device_map"] = {"": local_rank()}  # one of several training processes: its own GPU
        if cfg.load_in_4bit:
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=compute_dtype(cfg))
    log.info("loading base model %s (%s)", ref, ", ".join(f"{k}={v}" for k, v in kwargs.items()
                                                          if k != "quantization_config"))
    try:
        return AutoModelForCausalLM.from_pretrained(ref, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load base model {ref!r}: {exc}") from exc


def load_with_adapter(cfg: ModelConfig, adapter_dir: Path | None) -> tuple[Model, Tokenizer]:
    """(model, tokenizer) for evaluation or serving; the adapter's own tokenizer wins."""
    model = load_base_model(cfg)
    tokenizer = load_tokenizer(cfg, str(adapter_dir) if adapter_dir else None)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, str(adapter_dir))
    model.eval()
    return model, tokenizer


# What two LoRA adapters must share for one's weights to go into the modules the other built.
LORA_LAYOUT = ("r", "lora_alpha", "target_modules", "layers_to_transform", "modules_to_save", "use_rslora",
               "use_dora", "bias", "rank_pattern", "alpha_pattern")


def _layout(config: Any) -> dict[str, Any]:
    def plain(value: Any) -> Any:
        return sorted(value) if isinstance(value, (set, list, tuple)) else value

    return {key: plain(getattr(config, key, None)) for key in LORA_LAYOUT}


def use_adapter(model: Model, adapter_dir: Path) -> None:
    """Make `model` (a PeftModel) run the LoRA adapter in `adapter_dir` instead of its own.

    With the same layout (`LORA_LAYOUT`: a retrain of the same profile) its weights replace the active
    adapter's in place, so no module is added and whatever patched the existing ones (Unsloth's fused
    kernels, after training) still runs them; otherwise it is loaded beside the first and made active.
    """
    config = LoraConfig.from_pretrained(str(adapter_dir))
    name = model.active_adapter
    if _layout(config) != _layout(model.peft_config[name]):
        model.load_adapter(str(adapter_dir), adapter_name="second")
        model.set_adapter("second")
        return
    loaded = set_peft_model_state_dict(model, load_peft_weights(str(adapter_dir)), adapter_name=name)
    kept = [k for k in loaded.missing_keys if "lora_" in k or "modules_to_save" in k]
    if loaded.unexpected_keys or kept:
        raise ModelLoadError(f"the adapter in {adapter_dir} does not fill this model's adapter: unexpected "
                             f"{loaded.unexpected_keys[:3]}, not loaded {kept[:3]}")


def load_for_training(cfg: PipelineConfig, backend: str) -> tuple[Model, Tokenizer, LoraConfig | None]:
    """(model, tokenizer, peft_config) to train. Unsloth's model comes wrapped in its LoRA already;
    for the hf backend, TRL wraps the model in `peft_config` (and prepares a 4-bit one) itself."""
    lc, t = cfg.lora, cfg.train
    if backend == "hf":
        tokenizer, model = load_tokenizer(cfg.model), load_base_model(cfg.model)
        if t.gradient_checkpointing != "false" and getattr(model, "is_loaded_in_4bit", False):
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
        return model, tokenizer, lora_config(cfg, model.config.num_hidden_layers,
                                             tied=bool(model.config.get_text_config().tie_word_embeddings))
    from unsloth import FastLanguageModel  # optional (CUDA only); imported first by ml.backend

    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=model_ref(cfg.model), revision=cfg.model.revision,
        max_seq_length=cfg.model.max_seq_length, dtype=None if cfg.model.dtype == "auto" else compute_dtype(cfg.model),
        load_in_4bit=cfg.model.load_in_4bit)
    model = FastLanguageModel.get_peft_model(
        model, r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout, bias=lc.bias,
        target_modules=list(lc.target_modules), random_state=t.seed,
        use_gradient_checkpointing={"unsloth": "unsloth", "true": True, "false": False}[t.gradient_checkpointing],
        layers_to_transform=_layers(cfg, model.config.num_hidden_layers),
        modules_to_save=["lm_head"] if lc.train_lm_head else None)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer, None


def lora_config(cfg: PipelineConfig, num_layers: int, tied: bool = False) -> LoraConfig:
    """`tied`: the model's LM head is its embedding matrix (EXAONE-3.5-2.4B); a trained head stays so."""
    lc = cfg.lora
    return LoraConfig(
        r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout, bias=lc.bias,
        target_modules=list(lc.target_modules), layers_to_transform=_layers(cfg, num_layers),
        modules_to_save=["lm_head"] if lc.train_lm_head else None, task_type="CAUSAL_LM",
        ensure_weight_tying=tied and lc.train_lm_head)


def _layers(cfg: PipelineConfig, num_layers: int) -> list[int] | None:
    """The top `lora.top_k_layers` decoder layers, or None for every layer."""
    if not cfg.lora.top_k_layers:
        return None
    k = min(cfg.lora.top_k_layers, num_layers)
    return list(range(num_layers - k, num_layers))
