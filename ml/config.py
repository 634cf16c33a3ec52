"""One typed configuration for every step: a YAML profile plus overrides.

The defaults below are the shipped default profile (`pubmedqa-ko-llama31-8b`, the seed
project's settings); a profile in ``ml/profiles/`` (or any path) states only what differs,
and ``extends:`` names its parent. Each field's description is its one piece of
documentation: it feeds the Airflow trigger form (ml/params.py) and the reference in
docs/settings.md (ml/settings_reference.py). Overrides come from the CLI
(``--set train.learning_rate=1e-4``) or from the trigger form; both go through the same
validation, so a typo fails loudly instead of being ignored. Every field is either a training
setting or an operational one (`ROLES`).
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import unquote, urlsplit, urlunsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ml.distributed import split_batch
from ml.errors import ConfigError

PROFILES_DIR = Path(__file__).parent / "profiles"
DEFAULT_PROFILE = "pubmedqa-ko-llama31-8b"
CANONICAL_COLUMNS = ("QUESTION", "CONTEXTS", "LONG_ANSWER")

# The instruction of the seed project, in Korean: "Answer the medical question
# using the given research contexts."
DEFAULT_INSTRUCTION = "다음 의학 연구 질문에 주어진 연구 내용을 근거로 답하시오."


class _Strict(BaseModel):
    # NaN and infinity pass every bound (a NaN compares false), so no number field takes them.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")  # dataset files read here (ml/sources.py)


class DataConfig(_Strict):
    source: str = Field("ChuGyouk/PubMedQA-test-Ko", description=(
        "Hugging Face dataset id, or a local .jsonl/.json/.parquet/.csv file or `save_to_disk` folder "
        "(relative paths resolve against the project root, never the working directory). A hub id is `name` or "
        "`org/name`; anything else is a path, and a value that is neither is refused."))
    split: str = Field("test", description=(
        "Split to load from a dataset repository (hub id or its folder) or a `save_to_disk` DatasetDict. "
        "ChuGyouk/PubMedQA-test-Ko has one, `test`, named after its one file; a split the dataset lacks "
        "fails naming the ones it has."))
    revision: str | None = Field(None, description="Hub revision (tag, branch or commit) of the dataset.")
    columns: dict[str, str] = Field(default_factory=dict, description=(
        "Canonical column (QUESTION, CONTEXTS, LONG_ANSWER) -> its name in the source, for sources that differ."))
    id_column: str | None = Field(None, description=(
        "Column holding a stable row key (e.g. PMID). Without it the key is a hash of the normalised "
        "question, so splits survive re-ordering and appends."))
    decision_column: str | None = Field("final_decision", description=(
        "Column holding each row's yes/no/maybe decision (PubMedQA's `final_decision`), kept beside the "
        "answer and checked by the gate; null: the data has none."))
    lead_with_decision: bool = Field(False, description=(
        "Every answer starts with its decision (\"Yes. ...\"); evaluation then also reports how often "
        "each model's most likely first answer word is the right decision."))
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="Share of rows in the validation split (by key hash).")
    test_fraction: float = Field(0.1, gt=0.0, lt=1.0, description="Share of rows in the test split (by key hash).")
    instruction: str = Field(DEFAULT_INSTRUCTION, description="The Alpaca instruction of every prompt.")
    question_label: str = Field("질문", description=(
        "Label of the question in the prompt's input (the data's language)."))
    contexts_label: str = Field("연구 내용", description="Label of the contexts in the prompt's input.")

    @property
    def is_local(self) -> bool:
        """A file or folder here, not a hub id."""
        return local_path(self.source) is not None

    @field_validator("source")
    @classmethod
    def _source(cls, value: str) -> str:
        local_path(value)  # a path or a hub id, else refused here
        return value

    @property
    def uri(self) -> str:
        """The dataset as one URI, by which an upstream job announces new data (the DAG's Airflow Asset):
        `file:///abs/path` for a local source, `hf://datasets/<id>` (`@<revision>` when pinned) for the hub."""
        if self.is_local:
            return resolve_path(self.source).as_uri()
        return f"hf://datasets/{self.source}" + (f"@{self.revision}" if self.revision else "")

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

    min_rows: int = Field(100, ge=1, description="Fewest rows the gate accepts.")
    max_rows: int = Field(1_000_000, ge=1, description="Most rows the gate accepts.")
    question_chars: tuple[int, int] = Field((10, 1_000), description="[min, max] characters of a question.")
    context_chars: tuple[int, int] = Field((20, 20_000), description=(
        "[min, max] characters of a row's contexts, joined."))
    answer_chars: tuple[int, int] = Field((10, 5_000), description="[min, max] characters of an answer.")
    script: Literal["hangul", "latin"] | None = Field("hangul", description=(
        "Script the text is written in; per row, the share of its letters in that script must reach "
        "`min_share`. Catches mojibake. null: no check."))
    min_script_share: float = Field(0.5, ge=0.0, le=1.0, description="Per-row share of letters in `script`.")
    script_mostly: float = Field(0.95, gt=0.0, le=1.0, description="Share of rows that must pass the script check.")
    max_truncated_share: float = Field(0.1, ge=0.0, le=1.0, description=(
        "Fail when more than this share of rows exceed model.max_seq_length tokens (their answers would be cut)."))
    check_fit: bool = Field(True, description=(
        "Count each row's tokens with the base model's tokenizer (needs the tokenizer, not the weights)."))
    check_pii: bool = Field(True, description=(
        "Reject resident registration numbers, phone numbers and e-mail addresses."))

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
    base_model: str = Field("unsloth/Meta-Llama-3.1-8B-Instruct-bnb-4bit", description=(
        "Base model: a Hugging Face hub id or a local folder (as `data.source`: relative paths resolve against the "
        "project root)."))
    revision: str | None = Field(None, description="Hub revision (tag, branch or commit) of the base model.")
    max_seq_length: int = Field(512, gt=8, description=(
        "Tokens per example (prompt + answer); longer examples lose the end of their answer."))
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description=(
        "Precision of the weights: `auto` is bfloat16 (float16 without bf16 support) on CUDA; on the CPU "
        "bfloat16 where it has bf16 instructions (AVX512-BF16, AMX), faster there, else float32 (bfloat16 "
        "without them takes a generic path, many times slower)."))
    load_in_4bit: bool = Field(True, description=(
        "Load the base model in 4-bit NF4 on CUDA (the CPU loads full precision)."))
    use_chat_template: bool = Field(True, description=(
        "Render prompts through the tokenizer's chat template when it has one (else plain Alpaca text)."))

    @field_validator("base_model")
    @classmethod
    def _base_model(cls, value: str) -> str:
        local_path(value)  # a path or a hub id, else refused here
        return value


class LoraSettings(_Strict):
    r: int = Field(16, gt=0, le=1024, description="LoRA rank (at most 1024: a larger rank is no longer low-rank).")
    alpha: int = Field(16, gt=0, le=2048, description="LoRA alpha (the update is scaled by alpha / r; at most 2048).")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA path.")
    bias: Literal["none", "all", "lora_only"] = Field("none", description="Which biases train.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        description="Linear layers that get LoRA adapters.")
    top_k_layers: int | None = Field(None, gt=0, description=(
        "Adapt only the top k decoder layers (null: every layer, as the seed's code did). With "
        "`train_lm_head` this is the seed write-up's \"top 7 layers + LM head\" scope."))
    train_lm_head: bool = Field(False, description="Also train the LM head (saved whole with the adapter).")


class TrainConfig(_Strict):
    backend: Literal["auto", "hf", "unsloth"] = Field("auto", description=(
        "`unsloth`: Unsloth's 4-bit model, LoRA and gradient checkpointing; `hf`: transformers + peft "
        "(bitsandbytes NF4 on CUDA, full precision on the CPU); `auto`: unsloth where CUDA and Unsloth "
        "are importable, else hf."))
    per_device_train_batch_size: int = Field(12, gt=0, description=(
        "Examples per micro-batch. The seed trained 3 x 4 accumulation steps; the same 12 examples per "
        "optimizer step in one micro-batch keep the optimisation and use the GPU better."))
    gradient_accumulation_steps: int = Field(1, gt=0, description="Micro-batches per optimizer step.")
    num_processes: Literal["auto"] | Annotated[int, Field(ge=1)] = Field(1, description=(
        "Data-parallel training: processes that train together, each with a copy of the model on a GPU of its own "
        "(the train task starts them with PyTorch's torchrun; `auto`: one per GPU the worker sees, 1 without a "
        "GPU). The examples per optimizer step stay per_device_train_batch_size x gradient_accumulation_steps: the "
        "processes share them, dividing the accumulation steps first, then the micro-batch (a count that does not "
        "divide them is refused), so N processes train the updates one process trains (up to the order of sums). "
        "More than 1 needs train.isolate; on the CPU the processes share its cores (gloo)."))
    warmup_steps: int = Field(5, ge=0, description="Linear warm-up steps (ignored when warmup_ratio > 0).")
    warmup_ratio: float = Field(0.0, ge=0.0, lt=1.0, description=(
        "Warm-up as a share of all steps (0: use warmup_steps)."))
    max_steps: int = Field(60, ge=-1, le=1_000_000, json_schema_extra={"not": {"const": 0}}, description=(
        "Optimizer steps (-1: train for num_train_epochs; 0 is refused: it would register an untrained adapter)."))
    num_train_epochs: float = Field(1.0, gt=0, le=1000, description="Epochs, used when max_steps is -1.")
    learning_rate: float = Field(2e-4, gt=0.0, le=1.0, description=(
        "Peak learning rate (above 0, at most 1: a rate of 0 trains nothing). A training whose loss becomes "
        "NaN or infinite fails, naming the step."))
    lr_scheduler_type: str = Field("linear", description="transformers' learning-rate schedule after warm-up.")
    optim: str = Field("adamw_8bit", description=(
        "transformers' optimizer name; an 8-bit one becomes adamw_torch without CUDA."))
    weight_decay: float = Field(0.01, ge=0.0, le=1.0, description="AdamW weight decay.")
    gradient_checkpointing: Literal["unsloth", "true", "false"] = Field("unsloth", description=(
        "Recompute activations in the backward pass instead of keeping them: `unsloth` (offloaded to "
        "the CPU), `true` (transformers' own), `false`. Less memory, more time."))
    uncheckpointed_layers: Literal["auto"] | Annotated[int, Field(ge=0)] = Field("auto", description=(
        "Selective checkpointing (unsloth backend): the last N decoder layers keep their activations "
        "instead of recomputing them. Faster, more GPU memory; the same updates whatever N. `auto`: as many "
        "as fit, planned before step 1 from the GPU's free memory (see gpu_memory_fraction), the model's "
        "shape and the longest micro-batch (per_device_train_batch_size x model.max_seq_length) with a "
        "10 % margin (ml/memory_plan.py); a batch that does not fit even with every layer recomputed "
        "fails before training, naming the settings to lower. 0 on the CPU. The hf backend, whose layers "
        "keep several times more activations, checkpoints every layer."))
    gpu_memory_fraction: float | None = Field(None, gt=0.0, le=1.0, description=(
        "Cap the trainer's share of the GPU's memory (torch.cuda.set_per_process_memory_fraction; null: "
        "the whole card), e.g. 0.3 to train on an 80 GB card as a 24 GB one would. The `auto` layout "
        "plans within it."))
    pad_to_multiple_of: int | None = Field(64, gt=0, description=(
        "Pad each batch to a multiple of this many tokens (null: to its longest row). Fewer distinct "
        "batch shapes, so kernels and attention plans are built once, for a few pad tokens more."))
    packing: bool = Field(False, description="Pack several examples into one sequence (the seed: no packing).")
    loss_head: Literal["auto", "model", "trl"] = Field("auto", description=(
        "Where the LM head and cross-entropy run. `trl`: TRL's fused LM head (a Triton kernel, so CUDA "
        "only; never builds the full logits; logs entropy and token accuracy); `model`: the model's own "
        "forward with labels; `auto`: trl on CUDA, model elsewhere. The same loss either way."))
    padding_free: bool | None = Field(False, description=(
        "Batches without pad tokens (null: the backend's default; Unsloth turns it on by itself). On without "
        "a variable-length attention kernel (flash-attn) it ran 3x slower on an H100, and the trainer warns."))
    group_by_length: bool = Field(True, description=(
        "Batches of similar lengths (less padding; another example order than random)."))
    seed: int = Field(3407, ge=0, le=2**32 - 1, description=(
        "Random seed of LoRA initialisation, data order and dropout (0 to 2**32 - 1, NumPy's range)."))
    logging_steps: int = Field(1, gt=0, description="Log loss, learning rate and speed every N steps.")
    save_steps: int = Field(20, gt=0, description=(
        "Checkpoint every N steps, so a retry resumes instead of starting over."))
    timeout_per_step_s: float = Field(60.0, gt=0, description=(
        "The train task's time limit: this many seconds per optimizer step (counted from max_steps, or "
        "from the epochs and the training rows) plus timeout_startup_s, at most deploy.train_timeout_cap_h. A "
        "trainer past it is stopped; the retry resumes from its last checkpoint."))
    timeout_startup_s: float = Field(1800.0, gt=0, description=(
        "Seconds allowed on top of the steps for imports, model loading and the final save."))
    isolate: bool = Field(True, description=(
        "Train in a child process (`python -m ml train`): its CUDA memory is returned when it ends, and "
        "a crash or OOM fails the task instead of the worker."))
    warm_up_later_steps: bool = Field(True, description=(
        "`python -m ml pipeline` only: while the training process trains, the pipeline's own process "
        "imports what evaluate and register use and builds MLflow's map of installed packages (ml/pipeline/local.py), "
        "so those steps start at once. An Airflow run's steps are processes of their own: no effect there."))

    @field_validator("gradient_checkpointing", mode="before")
    @classmethod
    def _yaml_bool(cls, value: Any) -> Any:
        # YAML reads `gradient_checkpointing: true` as a bool; it means the string choice.
        return str(value).lower() if isinstance(value, bool) else value

    @model_validator(mode="after")
    def _processes(self) -> TrainConfig:
        if self.num_processes != "auto":  # `auto` is checked where the GPUs are counted (the train task)
            split_batch(self.per_device_train_batch_size, self.gradient_accumulation_steps, self.num_processes)
        return self

    @field_validator("max_steps")
    @classmethod
    def _steps(cls, value: int) -> int:
        if value == 0:
            raise ValueError("0 steps would register an untrained adapter: set at least 1, or -1 to train for "
                             "num_train_epochs")
        return value

    def optimizer_steps(self, train_rows: int) -> int:
        """How many optimizer steps training takes for `train_rows` rows."""
        if self.max_steps > 0:
            return self.max_steps
        per_epoch = math.ceil(train_rows / (self.per_device_train_batch_size * self.gradient_accumulation_steps))
        return math.ceil(per_epoch * self.num_train_epochs)

    def budget_s(self, train_rows: int) -> float:
        """Seconds the trainer may take for `train_rows` rows, before the deploy cap (see timeout_per_step_s)."""
        return self.timeout_startup_s + self.optimizer_steps(train_rows) * self.timeout_per_step_s


class EvalConfig(_Strict):
    eval_steps: int = Field(10, gt=0, description="Validation loss every N training steps.")
    batch_size: int = Field(4, gt=0, description="Examples per batch when scoring the test split.")
    num_sample_generations: int = Field(3, ge=0, description="Test questions answered by both models in the report.")
    sanity_prompts: int = Field(8, ge=0, description=(
        "Test prompts both models answer greedily for the degenerate_answers guardrail (the first that leave room "
        "for eval.max_new_tokens within model.max_seq_length; the report's samples are the first of them)."))
    max_new_tokens: int = Field(128, gt=0, description=(
        "Token budget of the generated answers (the report's samples, the degenerate_answers guardrail): an answer "
        "that has not ended by then never stopped."))
    score_while_loaded: bool = Field(True, description=(
        "Score the test split (challenger and champion or base model) in the training process right after "
        "training, while the model is loaded; the evaluate step then only checks the scores are current and "
        "decides. false: the evaluate step loads the model again and scores."))


GUARD_DIRECTIONS = {"decision_accuracy": "higher", "degenerate_answers": "lower"}


class GuardrailConfig(_Strict):
    """A task metric that must not get clearly worse for a challenger to be promoted (ml/promotion.py)."""

    metric: Literal["decision_accuracy", "degenerate_answers"] = Field(description=(
        "`decision_accuracy`: the share of test rows whose yes/no/maybe decision each model reads right as its "
        "answer's first word (data that leads with its decision); `degenerate_answers`: the share of greedy "
        "answers to the first eval.sanity_prompts test prompts that are empty, repeat themselves or do not stop "
        "within eval.max_new_tokens."))
    margin: float = Field(0.0, ge=0.0, lt=1.0, description=(
        "How much worse (a share: 0.02 is 2 points) the challenger may be before the guardrail keeps the champion: "
        "it blocks when the whole paired bootstrap interval of the change is beyond the margin, on the worse side."))
    direction: Literal["higher", "lower"] | None = Field(None, description=(
        "Which way is better (null: the metric's own, higher for decision_accuracy, lower for degenerate_answers)."))

    @model_validator(mode="after")
    def _direction(self) -> GuardrailConfig:
        own = GUARD_DIRECTIONS[self.metric]
        if self.direction is None:
            self.direction = own  # type: ignore[assignment]
        elif self.direction != own:
            raise ValueError(f"guardrail {self.metric} is better when {own}, not {self.direction}")
        return self


class RegistryConfig(_Strict):
    tracking_uri: str | None = Field(None, description=(
        "MLflow tracking URI (null: $MLFLOW_TRACKING_URI; with neither, every step that reads or writes the "
        "registry refuses to start instead of creating a local ./mlflow.db). Credentials never stay here: the "
        "`user:password@` of an http(s) URI (here or in $MLFLOW_TRACKING_URI) moves to "
        "MLFLOW_TRACKING_USERNAME/PASSWORD, where MLflow reads them, so that no log, param or file shows them; "
        "another URI with credentials is refused."))
    experiment: str = Field("pubmedqa-ko-lora", description=(
        "MLflow experiment of the runs (a name without quotes, '/', ':', '\\' or control characters, not "
        "starting with '.', at most 255 bytes)."))
    model_name: str = Field("pubmedqa-ko-llama31-8b-lora", description=(
        "Registered model the versions belong to (a name as `experiment`'s)."))
    champion_alias: str = Field("champion", description=(
        "Alias of the model in production (letters, digits, '_' and '-': MLflow's alias rule)."))
    previous_alias: str = Field("previous_champion", description=(
        "Alias the replaced champion keeps (for rollback; as `champion_alias`)."))
    min_delta: float = Field(0.01, ge=0.0, le=1.0, description=(
        "Margin in loss per answer token (nats): promote only when the lower bound of the improvement's "
        "confidence interval exceeds it. 0.01 is a 1 % lower perplexity, above the ~0.004 by which two runs "
        "differing only in seed differ (docs/pipeline.md#promotion); at most 1, a 2.7 times lower perplexity."))
    confidence: float = Field(0.95, gt=0.5, lt=1.0, description=(
        "Confidence of the paired bootstrap interval on the improvement."))
    bootstrap_resamples: int = Field(2000, ge=100, description="Resamples of the test rows in the paired bootstrap.")
    bootstrap_seed: int = Field(0, ge=0, le=2**32 - 1, description=(
        "Seed of the bootstrap's resampling (recorded with the decision)."))
    guardrails: list[GuardrailConfig] = Field(
        default_factory=lambda: [GuardrailConfig(metric="decision_accuracy", margin=0.02),
                                 GuardrailConfig(metric="degenerate_answers", margin=0.0)],
        description=(
            "Task metrics a promotion must not make clearly worse, each judged by the same paired bootstrap as the "
            "loss on the same test rows (metric, margin, direction); one that blocks keeps the champion whatever "
            "the loss. One that cannot be computed (no decision column) is reported as not applicable. Each "
            "entry: `metric` (decision_accuracy or degenerate_answers), `margin` (a share), `direction` "
            "(optional: higher or lower)."))
    approval: Literal["auto", "required"] = Field("auto", description=(
        "`required`: when the rule says promote, a person approves or rejects in Airflow before @champion "
        "moves (the `promote_or_keep` task asks in Required Actions, with the review card; its comment and who "
        "answered are recorded on the version). `auto`: the rule alone. `python -m ml pipeline` has nobody to "
        "ask: with `required` it keeps the champion and says how to promote by hand."))
    approval_timeout_h: float = Field(72.0, gt=0, le=24 * 90, description=(
        "Hours an approval waits for an answer; with none by then the champion stays, and people are told."))
    min_rows: int = Field(20, ge=1, description=(
        "Fewest comparable test rows (after leaving out the champion's training rows) for an automatic "
        "decision; fewer: needs_review."))
    request_timeout_s: float = Field(30.0, gt=0, le=600, description=(
        "Seconds an MLflow request may take before it fails (a tracking server that accepts connections "
        "but never answers ends the task instead of holding it)."))
    request_retries: int = Field(2, ge=0, le=10, description=(
        "Retries of a failed MLflow request inside one task attempt (the registry tasks also retry as "
        "Airflow tasks, with backoff)."))
    embed_base_max_gib: float = Field(2.0, ge=0.0, description=(
        "A local base model up to this size travels inside every registered model version; a larger "
        "one (an 8B model's 16 GB) is referenced by its path, which the serving machine must have."))
    artifact_location: str | None = Field(None, description=(
        "Artifact root of experiments created in a local (sqlite/file) store; an MLflow server proxies its own."))
    export_on_promotion: bool = Field(True, description=(
        "When a version becomes champion (the pipeline's promotion, `python -m ml promote --version N`, a "
        "rollback) and has no export yet: merge its adapter into a 16-bit copy of its base model (a 4-bit base "
        "is dequantized first), check the merged model against the adapter model on the version's test rows "
        "(mean per-row loss within 0.5 %, 99 % of 32 greedy tokens identical, the bare base model outside both) "
        "and store it beside the version, for serving engines (docs/deployment.md). A failed check records "
        "nothing. `python -m ml export --version N` exports any version."))
    require_export: bool = Field(False, description=(
        "A version becomes champion only with a merged model that passed its check: a failed export leaves "
        "@champion where it is (the promotion fails, saying why). Off, the alias moves and a failed export is "
        "only logged. Needs `export_on_promotion`."))
    export_prompts: int = Field(8, ge=1, le=256, description=(
        "Test prompts whose greedy continuations (their first 32 tokens) the export check compares."))

    @model_validator(mode="after")
    def _export(self) -> RegistryConfig:
        if self.require_export and not self.export_on_promotion:
            raise ValueError("registry.require_export needs registry.export_on_promotion: true (a promotion that "
                             "requires an export must make one)")
        return self

    @field_validator("tracking_uri")
    @classmethod
    def _no_credentials(cls, uri: str | None) -> str | None:
        return None if uri is None else move_credentials(uri, refuse_others=True)

    @field_validator("experiment", "model_name")
    @classmethod
    def _name(cls, value: str) -> str:
        # Quoted in MLflow's filter strings, a part of `models:/<name>/<version>` URIs, a folder of a
        # file store: each breaks on some character, late (at register) and for every later run.
        bad = UNSAFE_IN_NAME.search(value)
        if bad or not value.strip() or value.startswith(".") or len(value.encode()) > 255:
            raise ValueError(f"{value[:60]!r} cannot name an MLflow experiment or model: it must be non-empty, at "
                             "most 255 bytes, not start with '.', and hold no quote, '/', ':', '\\' or control "
                             "character" + (f" (found {bad.group()!r})" if bad else ""))
        return value

    @field_validator("champion_alias", "previous_alias")
    @classmethod
    def _alias(cls, value: str) -> str:
        if not re.fullmatch(r"[\w-]{1,255}", value) or value.lower() == "latest" or re.fullmatch(r"[vV]\d+", value):
            raise ValueError(f"{value[:60]!r} is not an MLflow alias: letters, digits, '_' and '-', at most 255, "
                             "neither 'latest' nor v<number> (MLflow reserves those)")
        return value


class DeployConfig(_Strict):
    """How the DAG is deployed. Airflow reads these when it parses the DAG file, from the default
    profile ($RETRAIN_PROFILE): a run's own profile (the trigger form's `profile`) cannot change them."""

    schedule: str | None = Field("@weekly", description=(
        "Airflow schedule of retraining (null: manual runs and new data only). Read from the default profile "
        "when the DAG is parsed. A time Airflow reaches more than 10 minutes late (the DAG paused, or Airflow "
        "down) is skipped, not run late, so unpausing never starts a retrain that was due before."))
    gpu_queue: str = Field("gpu", description=(
        "Airflow queue of the train, evaluate and promote tasks (the CUDA worker's). Read from the default "
        "profile when the DAG is parsed."))
    train_retries: int = Field(1, ge=0, description=(
        "Retries of the train task; a retry resumes from the last checkpoint. Read from the default profile "
        "when the DAG is parsed."))
    train_timeout_cap_h: float = Field(12.0, gt=0, le=168, description=(
        "Upper bound of the trainer's time limit, whatever the steps; the DAG's train task gets this plus 10 "
        "minutes as its execution_timeout, read from the default profile when the DAG is parsed."))


class PipelineConfig(_Strict):
    profile: str = Field(DEFAULT_PROFILE, description=(
        "Configuration profile (ml/profiles/*.yaml, or $RETRAIN_PROFILES_DIR); the other fields override it. "
        "A run's profile cannot change its `deploy` settings (schedule, queue, retries, the train cap): the DAG "
        "reads those from the default profile when it is parsed."))
    description: str = Field("", description="One line on what the profile is for.")
    output_dir: str = Field("state/runs", description="Where runs write snapshots, splits, adapters and reports.")
    form_roots: list[str] = Field(["data", "state"], description=(
        "Folders (relative to the project root, or absolute) that a local `dataset` or `base_model` given in "
        "the trigger form must lie in; the form refuses any other path (the workers' other files stay out of "
        "reports). Hub ids are not paths. The CLI is its user's own shell: its paths are not confined."))
    data: DataConfig = Field(default_factory=lambda: DataConfig())
    validation: ValidationConfig = Field(default_factory=lambda: ValidationConfig())
    model: ModelConfig = Field(default_factory=lambda: ModelConfig())
    lora: LoraSettings = Field(default_factory=lambda: LoraSettings())
    train: TrainConfig = Field(default_factory=lambda: TrainConfig())
    eval: EvalConfig = Field(default_factory=lambda: EvalConfig())
    registry: RegistryConfig = Field(default_factory=lambda: RegistryConfig())
    deploy: DeployConfig = Field(default_factory=lambda: DeployConfig())

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

    def training_settings(self) -> dict[str, Any]:
        """The training settings (`ROLES`), dotted name -> value: what the skip-when-unchanged hash
        counts and the review card compares with the champion's."""
        return {k: v for k, v in self.flat().items() if role(k) == "training"}

    def train_time_limit_s(self, train_rows: int) -> float:
        """The trainer's time limit for `train_rows` rows: its budget, at most the deploy cap."""
        return min(self.train.budget_s(train_rows), self.deploy.train_timeout_cap_h * 3600)


SECTIONS: dict[str, type[_Strict]] = {
    name: field.annotation for name, field in PipelineConfig.model_fields.items()  # type: ignore[misc]
    if isinstance(field.annotation, type) and issubclass(field.annotation, _Strict)}

# Every setting is either `training`: it may change the trained adapter (numerical noise included),
# or `operational`: where, when and how a run is supervised, judged and recorded. The hash behind
# "skip when data and config are unchanged" (ml/identity.py `config_hash`) counts only training
# settings, and the review card lists only those that differ from the champion's. An entry names a
# field or a whole section; each field matches exactly one (tests/test_config.py checks every field).
# The data's content is the fingerprint's business: where it is read from is operational.
ROLES: dict[str, tuple[str, ...]] = {
    "training": (
        "data.columns", "data.id_column", "data.decision_column", "data.lead_with_decision", "data.val_fraction",
        "data.test_fraction", "data.instruction", "data.question_label", "data.contexts_label",
        "model", "lora",
        "train.backend", "train.per_device_train_batch_size", "train.gradient_accumulation_steps",
        "train.num_processes",
        "train.warmup_steps", "train.warmup_ratio", "train.max_steps", "train.num_train_epochs",
        "train.learning_rate", "train.lr_scheduler_type", "train.optim", "train.weight_decay",
        "train.gradient_checkpointing", "train.uncheckpointed_layers", "train.pad_to_multiple_of", "train.packing",
        "train.loss_head", "train.padding_free", "train.group_by_length", "train.seed"),
    "operational": (
        "profile", "description", "output_dir", "form_roots", "data.source", "data.split", "data.revision",
        "validation", "eval", "registry", "deploy",
        "train.logging_steps", "train.save_steps", "train.timeout_per_step_s", "train.timeout_startup_s",
        "train.isolate", "train.warm_up_later_steps", "train.gpu_memory_fraction"),
}


def role(dotted: str) -> str:
    """`training` or `operational` (`ROLES`), for a dotted field name."""
    section = dotted.split(".")[0]
    found = [r for r, entries in ROLES.items() for e in entries if e in (dotted, section)]
    if len(found) != 1:
        raise ConfigError(f"setting {dotted!r} is {'classified twice' if found else 'not classified'} in ROLES")
    return found[0]


def project_root() -> Path:
    return Path(os.environ.get("RETRAIN_PROJECT_ROOT", Path(__file__).resolve().parent.parent))


def resolve_path(path: str) -> Path:
    """Relative paths in profiles are relative to the project root, not the CWD."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else project_root() / p


# `name` or `org/name`, as the hub spells repository ids (huggingface_hub's validate_repo_id).
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def local_path(value: str) -> Path | None:
    """Where a dataset or base model setting reads from: a local path, resolved against the project
    root (never the working directory), or None for a hub id. Refuses (ConfigError) a value that is
    neither, and a hub id that the loaders would read from the working directory instead: `datasets`
    and `transformers` try a local folder of that name first."""
    path, parts = resolve_path(value), Path(value).parts
    # A hub id has at most one '/' and no '..': anything else is a path (state/models/x may be built later).
    if (path.exists() or value.startswith(("/", "~", ".")) or value.endswith(LOCAL_SUFFIXES) or ".." in parts
            or len(parts) > 2):
        return path
    if not HUB_ID.fullmatch(value) or "--" in value:
        raise ConfigError(f"{value!r} is neither an existing path under the project root nor a hub id "
                          "(`name` or `org/name`: letters, digits, '-', '_' and '.')")
    if Path(value).exists():
        raise ConfigError(f"{value!r} is a hub id, but {Path(value).resolve()} in the working directory would be read "
                          "in its place: run from the project root, or give the local path in full")
    return None


UNSAFE_IN_NAME = re.compile(r"['\"`\\/:]|[\x00-\x1f\x7f]")
_USERINFO = re.compile(r"(?<=://)[^/\s?#]*@")  # the `user:password@` of a URI (up to its last '@')


def redact(text: str) -> str:
    """`text` with the credentials of every URI in it hidden: `http://***@host`."""
    return _USERINFO.sub("***@", text)


def move_credentials(uri: str, refuse_others: bool = False) -> str:
    """An http(s) tracking URI without its `user:password@`, which go to MLFLOW_TRACKING_USERNAME and
    MLFLOW_TRACKING_PASSWORD, where MLflow's client reads them: MLflow prints its tracking URI ("View
    run ... at: <uri>"), and the config's is logged as a param and frozen in the run folder. Any
    other URI comes back as it is, or, with `refuse_others`, refused where it holds credentials (a
    database URI needs them inside it)."""
    parts = urlsplit(uri)
    if "@" not in parts.netloc:
        return uri
    if parts.scheme not in ("http", "https"):
        if refuse_others:
            raise ValueError(f"{redact(uri)} holds credentials: set it as $MLFLOW_TRACKING_URI, not in a profile")
        return uri
    user, has_password, password = parts.netloc.rpartition("@")[0].partition(":")
    os.environ["MLFLOW_TRACKING_USERNAME"] = unquote(user)
    if has_password:
        os.environ["MLFLOW_TRACKING_PASSWORD"] = unquote(password)
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


NO_TRACKING_URI = ("no MLflow registry to use: set registry.tracking_uri in the profile (or --set "
                   "registry.tracking_uri=URI) or the environment's MLFLOW_TRACKING_URI")


def tracking_uri(reg: RegistryConfig) -> str:
    """The tracking URI every registry step uses: the profile's `registry.tracking_uri`, else
    $MLFLOW_TRACKING_URI. With neither, refused (ConfigError): MLflow would fall back to ./mlflow.db
    in the working directory, an empty registry created on the spot, where a rollback finds "no
    version 2" of a model whose versions live elsewhere."""
    uri = reg.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if not uri:
        raise ConfigError(NO_TRACKING_URI)
    return uri


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


def read_profile(name: str) -> tuple[dict[str, Any], str | None]:
    """A profile file's own settings (without its parent's) and the parent it extends."""
    path = _profile_path(name)
    raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"profile {path} must be a YAML mapping")
    parent = raw.pop("extends", None)
    return raw, parent


def _resolved_profile(name: str, seen: tuple[str, ...] = ()) -> dict[str, Any]:
    if name in seen:
        raise ConfigError(f"profile inheritance loops: {' -> '.join((*seen, name))}")
    raw, parent = read_profile(name)
    return _deep_merge(_resolved_profile(parent, (*seen, name)), raw) if parent else raw


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"cannot set {dotted!r}: {key!r} is not a section")
    node[keys[-1]] = value


def load_config(profile: str | None = None, overrides: dict[str, Any] | None = None) -> PipelineConfig:
    """Profile (default: $RETRAIN_PROFILE, else DEFAULT_PROFILE) + dotted overrides."""
    name = profile or os.environ.get("RETRAIN_PROFILE") or DEFAULT_PROFILE
    raw = _resolved_profile(name)
    raw["profile"] = Path(name).stem if name.endswith((".yaml", ".yml")) else name  # "exaone-3.5-2.4b" has no suffix
    for dotted, value in (overrides or {}).items():
        _set_dotted(raw, dotted, value)
    try:
        return PipelineConfig.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"invalid configuration (profile {name!r}): {problems}") from None


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """`key.sub=value` strings from the CLI; values are parsed as YAML scalars."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {pair!r} is not of the form section.field=value")
        out[key.strip()] = yaml.safe_load(value)
    return out
