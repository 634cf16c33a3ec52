"""One typed configuration for every step: a YAML profile plus overrides.

A profile is a YAML file in ``ml/profiles/`` (or any path); ``extends:`` names a
parent profile. Overrides come from the CLI (``--set train.learning_rate=1e-4``)
or from Airflow Params (flat names, see ``PARAM_PATHS``); both go through the
same validation, so a typo fails loudly instead of being ignored.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

PROFILES_DIR = Path(__file__).parent / "profiles"
DEFAULT_PROFILE = "pubmedqa-ko-llama31-8b"
CANONICAL_COLUMNS = ("QUESTION", "CONTEXTS", "LONG_ANSWER")

# The instruction of the seed project, in Korean: "Answer the medical question
# using the given research contexts."
DEFAULT_INSTRUCTION = "다음 의학 연구 질문에 주어진 연구 내용을 근거로 답하시오."


class ConfigError(ValueError):
    """A profile or override that cannot be used; the message names the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Strict):
    # A Hugging Face hub id, or a local .jsonl/.json/.parquet/.csv file or a
    # `save_to_disk` folder. Relative paths resolve against the project root.
    source: str = "ChuGyouk/PubMedQA-test-Ko"
    split: str = "train"
    revision: str | None = None
    # canonical column -> column name in the source, for sources that differ.
    columns: dict[str, str] = Field(default_factory=dict)
    # Column holding a stable row key (e.g. PMID). Without it, the key is a hash
    # of the normalised question, so splits survive re-ordering and appends.
    id_column: str | None = None
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    test_fraction: float = Field(0.1, gt=0.0, lt=1.0)
    instruction: str = DEFAULT_INSTRUCTION
    # Labels of the two parts of the Alpaca "input" (the data's language).
    question_label: str = "질문"
    contexts_label: str = "연구 내용"

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        unknown = set(self.columns) - set(CANONICAL_COLUMNS)
        if unknown:
            raise ValueError(f"data.columns maps unknown canonical columns {sorted(unknown)}; "
                             f"allowed: {list(CANONICAL_COLUMNS)}")
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError("data.val_fraction + data.test_fraction must leave rows for training")
        return self


class ValidationConfig(_Strict):
    """Thresholds of the data-quality gate (ml/validate.py); every check is a GX expectation."""

    min_rows: int = Field(100, ge=1)
    max_rows: int = Field(1_000_000, ge=1)
    # Characters per field (CONTEXTS: all contexts of a row joined).
    question_chars: tuple[int, int] = (10, 1_000)
    context_chars: tuple[int, int] = (20, 20_000)
    answer_chars: tuple[int, int] = (10, 5_000)
    # Script of the text: share of its letters that are Hangul (or Latin) per row,
    # required of `script_mostly` of the rows. None disables the check.
    script: Literal["hangul", "latin"] | None = "hangul"
    min_script_share: float = Field(0.5, ge=0.0, le=1.0)
    script_mostly: float = Field(0.95, gt=0.0, le=1.0)
    # Fail when more than this share of rows exceed model.max_seq_length tokens.
    max_truncated_share: float = Field(0.1, ge=0.0, le=1.0)
    check_fit: bool = True
    check_pii: bool = True

    @model_validator(mode="after")
    def _check(self) -> ValidationConfig:
        for name in ("question_chars", "context_chars", "answer_chars"):
            lo, hi = getattr(self, name)
            if not 0 <= lo <= hi:
                raise ValueError(f"validation.{name} must be [min, max] with 0 <= min <= max")
        if self.min_rows > self.max_rows:
            raise ValueError("validation.min_rows must not exceed validation.max_rows")
        return self


class ModelConfig(_Strict):
    base_model: str = "unsloth/Meta-Llama-3.1-8B-Instruct-bnb-4bit"
    revision: str | None = None
    max_seq_length: int = Field(512, gt=8)
    load_in_4bit: bool = True  # honoured on CUDA; the CPU path loads full precision
    use_chat_template: bool = True  # when the tokenizer has one


class LoraSettings(_Strict):
    r: int = Field(16, gt=0)
    alpha: int = Field(16, gt=0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    bias: Literal["none", "all", "lora_only"] = "none"
    target_modules: list[str] = Field(default_factory=lambda: [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    # None: every layer (the seed's code). k: only the top k decoder layers.
    top_k_layers: int | None = Field(None, gt=0)
    train_lm_head: bool = False  # "top 7 layers + LM head" in the seed's write-up


class TrainConfig(_Strict):
    backend: Literal["auto", "hf", "unsloth"] = "auto"
    per_device_train_batch_size: int = Field(3, gt=0)
    gradient_accumulation_steps: int = Field(4, gt=0)
    warmup_steps: int = Field(5, ge=0)
    warmup_ratio: float = Field(0.0, ge=0.0, lt=1.0)
    max_steps: int = -1  # -1: run num_train_epochs
    num_train_epochs: float = Field(1.0, gt=0)
    learning_rate: float = Field(2e-4, ge=0.0)
    lr_scheduler_type: str = "linear"
    optim: str = "adamw_8bit"  # falls back to adamw_torch without CUDA
    weight_decay: float = 0.01
    gradient_checkpointing: Literal["unsloth", "true", "false"] = "unsloth"
    # Selective checkpointing (unsloth backend): the last N decoder layers keep their
    # activations instead of recomputing them in the backward pass; each saves ~1/num_layers
    # of the recompute for ~batch x seq x 120 KB of GPU memory on Llama-3.1-8B. Same maths.
    uncheckpointed_layers: int = Field(0, ge=0)
    # Pad each batch to a multiple of this many tokens (None: to its longest row). Fewer
    # distinct shapes means fewer kernel autotunes and attention plans on the GPU.
    pad_to_multiple_of: int | None = Field(None, gt=0)
    packing: bool = False
    # Where the LM head and cross-entropy run. "trl": TRL's fused LM head (a Triton kernel:
    # never builds the full logits, logs entropy and token accuracy). "model": the model's
    # own forward with labels (Unsloth's fused cross-entropy; transformers' full logits).
    # "auto": trl on CUDA (on an H100 at the seed's shape it also beat Unsloth's own loss
    # by 10-25 % in tokens/s, docs/benchmarks.md), model on the CPU. The same loss either way.
    loss_head: Literal["auto", "model", "trl"] = "auto"
    # Throughput options that keep the optimisation the same (examples per optimizer
    # step, schedule): no pad tokens in a batch (None: the backend's default; Unsloth
    # turns it on by itself), batches of similar lengths.
    padding_free: bool | None = None
    group_by_length: bool = False
    seed: int = 3407
    logging_steps: int = Field(1, gt=0)
    # The CUDA worker: the Airflow queue of the train (and evaluate) task, its retries,
    # and checkpoints every `save_steps` so that a retry resumes instead of starting over.
    queue: str = "gpu"
    retries: int = Field(1, ge=0)
    save_steps: int = Field(20, gt=0)
    # Train in a child process (`python -m ml train`), so CUDA memory is returned
    # when it ends and a crash or OOM fails the task instead of the worker.
    isolate: bool = True

    @field_validator("gradient_checkpointing", mode="before")
    @classmethod
    def _yaml_bool(cls, value: Any) -> Any:
        # YAML reads `gradient_checkpointing: true` as a bool; it means the string choice.
        return str(value).lower() if isinstance(value, bool) else value


class EvalConfig(_Strict):
    eval_steps: int = Field(10, gt=0)
    batch_size: int = Field(4, gt=0)
    num_sample_generations: int = Field(3, ge=0)
    max_new_tokens: int = Field(128, gt=0)


class RegistryConfig(_Strict):
    # None: MLflow's own resolution (MLFLOW_TRACKING_URI). Credentials never
    # live here: MLflow reads MLFLOW_TRACKING_USERNAME/PASSWORD from the env.
    tracking_uri: str | None = None
    experiment: str = "pubmedqa-ko-lora"
    model_name: str = "pubmedqa-ko-llama31-8b-lora"
    champion_alias: str = "champion"
    previous_alias: str = "previous_champion"
    min_delta: float = Field(0.0, ge=0.0)
    # Artifact root for experiments created against a local (sqlite/file)
    # store; ignored for an MLflow server, which proxies its own.
    artifact_location: str | None = None


class PipelineConfig(_Strict):
    profile: str = DEFAULT_PROFILE
    description: str = ""
    schedule: str | None = "@weekly"
    # Where runs write snapshots, splits, adapters and reports.
    output_dir: str = "state/runs"
    data: DataConfig = Field(default_factory=lambda: DataConfig())
    validation: ValidationConfig = Field(default_factory=lambda: ValidationConfig())
    model: ModelConfig = Field(default_factory=lambda: ModelConfig())
    lora: LoraSettings = Field(default_factory=lambda: LoraSettings())
    train: TrainConfig = Field(default_factory=lambda: TrainConfig())
    eval: EvalConfig = Field(default_factory=lambda: EvalConfig())
    registry: RegistryConfig = Field(default_factory=lambda: RegistryConfig())

    def flat(self) -> dict[str, Any]:
        """Every field as dotted-name -> value: what MLflow logs as params."""
        out: dict[str, Any] = {}

        def walk(prefix: str, value: Any) -> None:
            if isinstance(value, dict):
                for k, v in value.items():
                    walk(f"{prefix}.{k}" if prefix else k, v)
            else:
                out[prefix] = value

        walk("", self.model_dump(mode="json"))
        return out


# Airflow Param name -> config field. These are the knobs the trigger form shows.
PARAM_PATHS: dict[str, str] = {
    "dataset": "data.source",
    "dataset_split": "data.split",
    "base_model": "model.base_model",
    "learning_rate": "train.learning_rate",
    "max_steps": "train.max_steps",
    "num_train_epochs": "train.num_train_epochs",
    "lora_r": "lora.r",
    "lora_alpha": "lora.alpha",
    "min_delta": "registry.min_delta",
}


def project_root() -> Path:
    return Path(os.environ.get("RETRAIN_PROJECT_ROOT", Path(__file__).resolve().parent.parent))


def resolve_path(path: str) -> Path:
    """Relative paths in profiles are relative to the project root, not the CWD."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else project_root() / p


def profile_dirs() -> list[Path]:
    """$RETRAIN_PROFILES_DIR (a team's own profiles, searched first), then the shipped ones."""
    extra = os.environ.get("RETRAIN_PROFILES_DIR")
    return ([Path(extra)] if extra else []) + [PROFILES_DIR]


def available_profiles() -> list[str]:
    return sorted({p.stem for d in profile_dirs() for p in d.glob("*.yaml")})


def _profile_path(name: str) -> Path:
    candidate = Path(name)
    if candidate.suffix in {".yaml", ".yml"} and candidate.exists():
        return candidate
    for folder in profile_dirs():
        path = folder / f"{name}.yaml"
        if path.exists():
            return path
    raise ConfigError(f"unknown profile {name!r}; available: {', '.join(available_profiles())} "
                      "(or pass a path to a .yaml file)")


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _read_profile(name: str, seen: tuple[str, ...] = ()) -> dict[str, Any]:
    if name in seen:
        raise ConfigError(f"profile inheritance loops: {' -> '.join((*seen, name))}")
    path = _profile_path(name)
    raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"profile {path} must be a YAML mapping")
    parent = raw.pop("extends", None)
    if parent:
        raw = _deep_merge(_read_profile(parent, (*seen, name)), raw)
    return raw


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"cannot set {dotted!r}: {key!r} is not a section")
    node[keys[-1]] = value


def load_config(profile: str | None = None, overrides: dict[str, Any] | None = None) -> PipelineConfig:
    """Profile (default: $RETRAIN_PROFILE or the production seed) + dotted overrides."""
    name = profile or os.environ.get("RETRAIN_PROFILE") or DEFAULT_PROFILE
    raw = _read_profile(name)
    raw["profile"] = Path(name).stem
    for dotted, value in (overrides or {}).items():
        _set_dotted(raw, dotted, value)
    try:
        return PipelineConfig.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"invalid configuration (profile {name!r}): {problems}") from None


def config_from_params(params: dict[str, Any]) -> PipelineConfig:
    """Airflow Params -> config. A None/empty Param means "keep the profile's value"."""
    overrides = {PARAM_PATHS[k]: v for k, v in params.items()
                 if k in PARAM_PATHS and v not in (None, "")}
    return load_config(params.get("profile") or None, overrides)


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """`key.sub=value` strings from the CLI; values are parsed as YAML scalars."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {pair!r} is not of the form section.field=value")
        out[key.strip()] = yaml.safe_load(value)
    return out
