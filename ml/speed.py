"""The trainer's speed machinery: each part switched on by a config key, none changing an update.

The recipe (ml/train.py) builds TRL's SFTTrainer with these parts:

  HostCollator            wraps the data collator: counts non-padding tokens on the host and, for
                          the fused loss head, finds the labelled positions there
  SpeedMeter              callback: step, loss, tokens/s and GPU memory in the log, leaving out
                          evaluation and checkpoint time
  selective_checkpointing train.uncheckpointed_layers: the last N decoder layers keep their
                          activations instead of recomputing them (faster, more memory)
  plan_activations        train.uncheckpointed_layers=auto: N planned from the GPU's free memory
                          (ml/memory_plan.py), or a failure before training when nothing fits;
                          train.gpu_memory_fraction caps the process's share of the card
  ProjectSFTTrainer       train.loss_head: TRL's fused LM head on the host-found positions, its
                          metrics read from the GPU once per logging step; its training sampler
                          (StepSampler) gives every optimizer step the same examples whatever
                          train.num_processes
  loop_args               SFTConfig fields that keep the loop from waiting for the GPU

At the seed's shape (3 x 512) the loop is paced by the host, so every time the host waits for the
GPU, the GPU then waits for the host: most of what is here removes such waits.

TRL and transformers internals (private, or undocumented and free to change between releases) are
used here and nowhere else in the project. `INTERNALS` lists them, and `missing_internals` (run by
tests/test_speed.py) names any that an upgrade removed or renamed.
"""

from __future__ import annotations

import ast
import functools
import importlib
import importlib.util
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.trainer_pt_utils import BatchRebalanceSampler, get_length_grouped_indices
from trl import SFTTrainer  # Unsloth's subclass when Unsloth was imported first (ml.backend)

from ml import memory_plan
from ml.distributed import BatchSplit, rank_batches
from ml.errors import ConfigError

log = logging.getLogger(__name__)

WARMUP_STEPS_UNTIMED = 2  # the first steps build kernels and warm allocators: not counted in speed
LABEL_POSITIONS = "label_positions"  # the batch key of HostCollator's loss positions

# Module-level internals: (module, name) -> what this module uses it for.
INTERNALS: dict[tuple[str, str], str] = {
    ("trl.kernels", "ChunkedLogProbFunction"): "TRL's fused LM-head kernel (Triton), the loss of loss_head=trl",
    ("trl.trainer.utils", "_CHUNKED_LOGPROB_CHUNK_SIZE"): "the chunk size TRL's own fused forward gives that kernel",
    ("transformers.modeling_layers", "GradientCheckpointingLayer"): "the decoder layers that checkpoint",
    ("transformers.trainer_pt_utils", "BatchRebalanceSampler"):
        "the sampler class Trainer takes as a batch sampler divided among the processes already (StepSampler's base)",
    ("transformers.trainer_pt_utils", "get_length_grouped_indices"): "group_by_length's order (StepSampler's)",
}
# Attributes of live objects: an SFTTrainer, and a decoder layer with checkpointing switched on.
TRAINER_INTERNALS = {
    "_metrics": "SFTTrainer's per-micro-batch metrics, averaged at each log (read here once per log)",
    "aux_loss_enabled": "SFTTrainer's switch for a router loss, which the fused head does not add",
    "_get_train_sampler": "Trainer's hook that builds the training sampler (StepSampler here)",
}
LAYER_CHECKPOINT_FUNCTION = "_gradient_checkpointing_func"  # replaced by selective checkpointing
LAYER_INTERNALS = {LAYER_CHECKPOINT_FUNCTION: "a decoder layer's checkpoint function"}


def internal(module: str, name: str) -> Any:
    """One of `INTERNALS`, imported where it is used; an upgrade that removed it fails here, named."""
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise RuntimeError(f"{module}.{name} is gone from the installed version ({exc}); ml/speed.py uses it "
                           f"as {INTERNALS[(module, name)]}. Pin the version in requirements/constraints.txt "
                           "or switch the option off.") from exc


def _defines(module: str, name: str) -> bool:
    try:
        return hasattr(importlib.import_module(module), name)
    except ModuleNotFoundError as exc:
        if exc.name is None or module == exc.name or module.startswith(exc.name + "."):
            return False  # the module itself is gone
    # It imports what this machine lacks (Triton, without CUDA): read its source instead.
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        return False
    tree = ast.parse(Path(spec.origin).read_text(encoding="utf-8"))
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.ClassDef, ast.FunctionDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update(a.asname or a.name for a in node.names)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(t.id for t in targets if isinstance(t, ast.Name))
    return name in names


def missing_internals(trainer: Any, layer: Any) -> list[str]:
    """Each internal the installed TRL/transformers lack, as "name: what it is used for"."""
    missing = [f"{m}.{n}: {why}" for (m, n), why in INTERNALS.items() if not _defines(m, n)]
    for obj, names in ((trainer, TRAINER_INTERNALS), (layer, LAYER_INTERNALS)):
        missing += [f"{type(obj).__name__}.{n}: {why}" for n, why in names.items() if not hasattr(obj, n)]
    return missing


def peak_gpu_gib() -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


def loop_args(cuda: bool) -> dict[str, Any]:
    """SFTConfig fields that keep the training loop from waiting for the GPU."""
    return {
        # Both cost a device->host sync per micro-batch: tokens are counted on the host
        # (HostCollator), and a NaN/inf loss is logged as it is rather than replaced.
        "include_num_input_tokens_seen": "no",
        "logging_nan_inf_filter": False,
        # A plain copy of a batch to the GPU waits for all queued GPU work first; from pinned
        # memory it runs without blocking, so the host goes on queueing the next micro-batch.
        "dataloader_pin_memory": cuda,
        "accelerator_config": {"non_blocking": cuda},
    }


class HostCollator:
    """Wraps the data collator: what the loop needs to know of a batch, read on the host as it is built.

    The non-padding tokens (throughput) and, with `label_positions`, where the loss is taken:
    the flat index (row x length + column) of each position whose next token is labelled.
    Read from the GPU instead, each costs a wait for all queued GPU work, once per micro-batch.

    An empty micro-batch (a process of several with no example left in the epoch's last step,
    StepSampler) becomes one `blank_token` without a label: a forward and backward that add nothing
    to the loss or the gradients, as the other processes' gradients wait for this one's.
    """

    def __init__(self, collate: Any, label_positions: bool = False, blank_token: int = 0) -> None:
        self.collate = collate
        self.label_positions = label_positions
        self.blank = {"input_ids": [blank_token], "labels": [-100]}
        self.tokens = 0

    def __call__(self, features: Any) -> Any:
        batch = self.collate(list(features) or [self.blank])
        mask = batch.get("attention_mask")
        if features:
            self.tokens += int(mask.sum()) if mask is not None else int(batch["input_ids"].numel())
        if self.label_positions:
            labels = batch["labels"]
            rows, cols = (labels[:, 1:] != -100).nonzero(as_tuple=True)
            batch[LABEL_POSITIONS] = rows * labels.shape[1] + cols
        return batch


class SpeedMeter(TrainerCallback):  # type: ignore[misc]
    """Logs step, loss, tokens/s and GPU memory; keeps timings for the result.

    A line for each of the first steps, every evaluation, the last step and about every 5 % of
    the run between (every step's numbers are in the trainer's log history). Evaluation and
    checkpoint saving are paused out: the speed is the training loop's.
    """

    def __init__(self, counter: HostCollator, processes: int = 1) -> None:
        self.counter, self.processes = counter, processes
        self.marks: list[tuple[int, float, int]] = []  # (step, training time, training tokens)
        self.t0 = self.last = time.perf_counter()
        self.last_tokens = 0
        self.paused_s, self.paused_tokens = 0.0, 0

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.last, self.last_tokens = time.perf_counter(), self.counter.tokens
        self.marks.append((state.global_step, self.last - self.paused_s, self.last_tokens - self.paused_tokens))

    def _pause(self) -> None:
        now = time.perf_counter()
        self.paused_s += now - self.last
        self.paused_tokens += self.counter.tokens - self.last_tokens
        self.last, self.last_tokens = now, self.counter.tokens

    def on_evaluate(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self._pause()

    def on_save(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self._pause()

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
        logs = logs or {}
        step, every = state.global_step, max(1, state.max_steps // 20)
        if not ("eval_loss" in logs or step <= WARMUP_STEPS_UNTIMED + 1 or step % every == 0
                or step >= state.max_steps):
            return
        parts = [f"step {step}/{state.max_steps}"]
        parts += [f"{key}={logs[key]:.4g}" for key in ("loss", "eval_loss", "learning_rate", "grad_norm")
                  if key in logs]
        speed, gib = self.tokens_per_s(), peak_gpu_gib()
        if speed:  # of this process (rank 0's, with several): the result has the whole job's
            parts.append(f"tokens/s={speed:.0f}" if self.processes == 1 else f"rank0_tokens/s={speed:.0f}")
        if gib is not None:
            parts.append(f"gpu_mem_peak={gib:.1f}GiB")
        parts.append(f"elapsed={time.perf_counter() - self.t0:.1f}s")
        log.info(" ".join(parts))

    def _timed(self) -> list[tuple[int, float, int]]:
        return self.marks[WARMUP_STEPS_UNTIMED:] if len(self.marks) > WARMUP_STEPS_UNTIMED + 1 else []

    def tokens_per_s(self, total: Callable[[float], float] = float) -> float | None:
        """This process's tokens per second of training; with `total` (ml.distributed.sum_over_processes,
        which every process must call), every process's tokens over this one's training time."""
        m = self._timed()
        tokens = total(m[-1][2] - m[0][2] if m else 0)
        return tokens / (m[-1][1] - m[0][1]) if m and m[-1][1] > m[0][1] else None

    def step_s(self) -> float | None:
        """Median optimizer-step time."""
        m = self._timed()
        gaps = sorted(b[1] - a[1] for a, b in zip(m, m[1:], strict=False))
        return gaps[len(gaps) // 2] if gaps else None


def _run_directly(function: Any, *args: Any, **kwargs: Any) -> Any:
    return function(*args, **kwargs)


def keep_activations(model: Any, num_layers: int) -> list[str]:
    """Selective activation checkpointing: the last `num_layers` decoder layers skip the recompute.

    Their checkpoint function becomes a plain call, so they keep their activations for the
    backward pass whatever the checkpointing flags say. Returns the names of the layers changed.
    """
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, GradientCheckpointingLayer)]
    chosen = layers[len(layers) - min(num_layers, len(layers)):] if num_layers else []
    for _, layer in chosen:
        setattr(layer, LAYER_CHECKPOINT_FUNCTION, _run_directly)
    return [n for n, _ in chosen]


class SelectiveCheckpointing(TrainerCallback):  # type: ignore[misc]
    """Applies `keep_activations` at train begin: the model is final by then (Unsloth re-sets its
    checkpointing on every `train()`), so nothing installs the recompute again after it."""

    def __init__(self, num_layers: int) -> None:
        self.num_layers = num_layers

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
        names = keep_activations(model, self.num_layers)
        log.info("selective checkpointing: %d decoder layers keep their activations (%s .. %s)",
                 len(names), names[0] if names else "-", names[-1] if names else "-")


def selective_checkpointing(num_layers: int, checkpointing: str, backend: str) -> list[TrainerCallback]:
    """The callback for `train.uncheckpointed_layers`, where it applies (checkpointing on, unsloth)."""
    if not num_layers or checkpointing == "false":
        return []
    if backend != "unsloth":  # transformers' layers keep several times Unsloth's activations
        log.info("train.uncheckpointed_layers=%d is for the unsloth backend; the hf backend keeps more "
                 "activations per layer, so it checkpoints every layer", num_layers)
        return []
    return [SelectiveCheckpointing(num_layers)]


def cap_gpu_memory(fraction: float | None) -> None:
    """`train.gpu_memory_fraction`: the caching allocator of this process stops at that share of the card."""
    if fraction is not None and torch.cuda.is_available():
        torch.cuda.set_per_process_memory_fraction(fraction)
        log.info("GPU memory capped at %.0f %% of the card (%.1f GiB): train.gpu_memory_fraction", 100 * fraction,
                 fraction * torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / 2**30)


def usable_gpu_bytes(fraction: float | None) -> int:
    """What this process may hold on the GPU in all: the free memory and what it holds already (its
    allocator's reserve), at most `fraction` of the card when the allocator is capped."""
    free, total = torch.cuda.mem_get_info()
    usable = free + torch.cuda.memory_reserved()
    return int(min(usable, fraction * total)) if fraction is not None else int(usable)


def model_shape(model: Any) -> memory_plan.ModelShape:
    text = model.config.get_text_config()
    heads = text.num_attention_heads
    return memory_plan.ModelShape(
        text.num_hidden_layers, text.hidden_size, text.intermediate_size, heads,
        getattr(text, "num_key_value_heads", None) or heads, text.vocab_size,
        bool(getattr(text, "tie_word_embeddings", False)))


@dataclass(frozen=True)
class Layout:
    """Which decoder layers keep their activations, and why: logged, and written beside the result."""
    uncheckpointed_layers: int
    reason: str
    planned_peak_gib: float | None = None
    usable_gib: float | None = None


def plan_activations(requested: int | str, *, model: Any, backend: str, checkpointing: str, batch_size: int,
                     max_seq_length: int, pad_to_multiple_of: int | None, optim: str, loss_head: str,
                     fraction: float | None) -> Layout:
    """`train.uncheckpointed_layers` resolved before step 1. `auto` on CUDA with the unsloth backend plans
    from the memory this process may use (ml/memory_plan.py) for the longest micro-batch the data can
    produce; a plan that fits with no layer kept (every layer recomputed) raises ConfigError, naming the
    settings to lower. Elsewhere `auto` is 0 (the CPU: nothing to plan; hf: every layer checkpointed), and
    a fixed number is used as given (on CUDA with its estimated peak, warned when over the memory)."""
    if not torch.cuda.is_available() or backend != "unsloth":
        fixed = 0 if requested == "auto" else int(requested)
        where = "no GPU" if not torch.cuda.is_available() else f"the {backend} backend"
        return Layout(fixed, f"train.uncheckpointed_layers={requested}: {fixed} ({where}: not planned)")
    shape = model_shape(model)
    batch = memory_plan.Batch(batch_size, max_seq_length, pad_to_multiple_of)
    usable = usable_gpu_bytes(fraction)
    kw = {"weights_bytes": torch.cuda.memory_allocated(),  # the model as loaded, its LoRA weights included
          "lora_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
          "optimizer": "8bit" if "8bit" in optim else "fp32", "checkpointing": checkpointing,
          "full_logits": loss_head == "model"}
    plan = memory_plan.plan_layout(usable, shape, batch, **kw)  # type: ignore[arg-type]
    if not plan.fits:
        raise ConfigError(
            f"the training does not fit this GPU: {plan.reason}. Lower train.per_device_train_batch_size "
            "(raising train.gradient_accumulation_steps keeps the examples per optimizer step) or "
            "model.max_seq_length" + (", or set train.gradient_checkpointing" if checkpointing == "false" else "")
            + (f", or raise train.gpu_memory_fraction ({fraction})" if fraction is not None else ""))
    if requested == "auto":
        return Layout(plan.kept_layers, f"train.uncheckpointed_layers=auto: {plan.reason}",
                      round(plan.peak_gib, 2), round(usable / 2**30, 2))
    fixed = int(requested)
    peak = memory_plan.peak_bytes(shape, batch, min(fixed, shape.num_layers), **kw) / 2**30  # type: ignore[arg-type]
    room = (usable - plan.margin_bytes) / 2**30
    if peak > room:
        log.warning("train.uncheckpointed_layers=%d may not fit: about %.1f GiB at the longest micro-batch, "
                    "%.1f GiB usable less the margin; `auto` would keep %d", fixed, peak, room, plan.kept_layers)
    return Layout(fixed, f"train.uncheckpointed_layers={fixed} (as set): about {peak:.1f} GiB at the longest "
                  f"micro-batch; auto would keep {plan.kept_layers}", round(peak, 2), round(usable / 2**30, 2))


VARLEN_PACKAGES = ("flash_attn", "flash_attn_interface")  # FlashAttention 2, FlashAttention 3 (Hopper)


def varlen_attention(model: Any) -> str | None:
    """The variable-length attention kernel a padding-free batch can use here, or None: an installed
    FlashAttention package, or a FlashAttention variant as the model's attention implementation."""
    for package in VARLEN_PACKAGES:
        if importlib.util.find_spec(package) is not None:
            return package
    implementation = str(getattr(getattr(model, "config", None), "_attn_implementation", None) or "")
    return implementation if "flash" in implementation else None


def warn_padding_free(padding_free: bool | None, model: Any) -> bool:
    """`train.padding_free: true` without a variable-length attention kernel: a warning with its measured
    cost (it changes no update, so it is not refused). Returns whether it warned."""
    if not padding_free or varlen_attention(model) is not None:
        return False
    log.warning("train.padding_free=true without a variable-length attention kernel (no flash_attn installed, "
                "attention %s): padding-free batches ran 3x slower on an H100 (3,689 against 10,520 tokens/s "
                "padded, docs/benchmarks.md). Set train.padding_free=false, or install flash-attn",
                getattr(getattr(model, "config", None), "_attn_implementation", None) or "unknown")
    return True


def resolve_loss_head(requested: str, cuda: bool, processes: int = 1) -> str:
    """"auto": TRL's fused head wherever its Triton kernel runs (CUDA) in one process, the model's own loss
    elsewhere. With several processes the head is the model's: the fused path here is written for one
    (ProjectSFTTrainer), and TRL's own gathers metrics from every process at each micro-batch."""
    if requested == "trl" and not cuda:
        log.warning("train.loss_head=trl needs CUDA (TRL's head is a Triton kernel); using the model's own loss")
    if requested == "trl" and processes > 1:
        log.warning("train.loss_head=trl trains in one process; with train.num_processes=%d the model's own loss "
                    "runs", processes)
    if requested == "model" or not cuda or processes > 1:
        return "model"
    return "trl"


class StepSampler(BatchRebalanceSampler):  # type: ignore[misc]
    """The training batches of one process: every optimizer step trains the same examples whatever the
    process count (ml/distributed.py `rank_batches` deals each step's examples to the processes).

    The epoch's order is drawn from `seed` + the epoch, the same in every process and on a resumed
    attempt: `random`, a permutation; `group_by_length`, transformers' length-grouped order with its
    mega-batches counted in optimizer steps (transformers counts them in one process's micro-batches x
    accumulation, which would change with the process count). Trainer passes a `BatchRebalanceSampler`
    to the DataLoader as its batch sampler, already divided among the processes, and keeps accelerate
    from dividing it again: StepSampler borrows that treatment, nothing of its algorithm. The epoch is
    read from the trainer's state (`epoch_of`) as the epoch's batches are drawn: on a resumed attempt
    transformers' own `set_epoch` does not reach a sampler of several processes."""

    def __init__(self, lengths: list[int], split: BatchSplit, rank: int, seed: int, grouped: bool,
                 epoch_of: Callable[[], int]) -> None:  # BatchRebalanceSampler's __init__ is not used
        self.lengths, self.split, self.rank, self.seed, self.grouped = lengths, split, rank, seed, grouped
        self.epoch_of = epoch_of

    def order(self) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch_of())
        if self.grouped:
            return list(get_length_grouped_indices(self.lengths, self.split.examples_per_step, generator=generator))
        return torch.randperm(len(self.lengths), generator=generator).tolist()  # type: ignore[no-any-return]

    def __iter__(self) -> Any:
        return iter(rank_batches(self.order(), self.split, self.rank))

    def __len__(self) -> int:
        return len(rank_batches(range(len(self.lengths)), self.split, self.rank))


def _causal_lm(model: Any) -> Any:
    """The causal LM inside a peft wrapper (with its LoRA layers), or the model itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _plain_logits(causal_lm: Any) -> bool:
    """Log-probs straight from the LM head: no logit scaling or softcapping (Llama, Qwen, EXAONE)."""
    text = causal_lm.config.get_text_config()
    return all(getattr(text, key, None) is None for key in (
        "final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling"))


class ProjectSFTTrainer(SFTTrainer):  # type: ignore[misc]
    """SFTTrainer whose training loss runs where `loss_head` says.

    "trl": TRL's fused LM head kernel on the positions HostCollator found, its metrics kept on
    the GPU until a logging step. "model": the model's own forward with labels, as `Trainer`
    does. The same per-token NLL over the same labels either way.
    """

    def __init__(self, *args: Any, loss_head: str = "model", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.loss_head = loss_head

    def _get_train_sampler(self, train_dataset: Any = None) -> Any:
        """StepSampler for `random` and `group_by_length`: the same examples per optimizer step in one
        process or several."""
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        strategy = self.args.train_sampling_strategy
        if strategy not in ("random", "group_by_length") or dataset is None or not hasattr(dataset, "__len__"):
            return super()._get_train_sampler(train_dataset)
        a = self.args
        split = BatchSplit(a.world_size, a.per_device_train_batch_size, a.gradient_accumulation_steps)
        return StepSampler([len(ids) for ids in dataset["input_ids"]], split, a.process_index,
                           a.data_seed if a.data_seed is not None else a.seed, strategy == "group_by_length",
                           epoch_of=lambda: math.floor(self.state.epoch or 0))

    def compute_loss(self, model: Any, inputs: Any, return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        positions = inputs.pop(LABEL_POSITIONS, None)
        if self.loss_head == "model":
            return Trainer.compute_loss(self, model, inputs, return_outputs, num_items_in_batch)
        if (return_outputs or not model.training or positions is None or "shift_labels" in inputs
                or not self._plain_nll_setup):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        return self._fused_head_loss(model, inputs, positions, num_items_in_batch)

    @functools.cached_property
    def _plain_nll_setup(self) -> bool:
        # Fixed for a trainer, so read once rather than on every micro-batch: a plain next-token
        # NLL in one process on a model whose log-probs come straight from its head.
        return bool(self.args.loss_type == "nll" and not self.aux_loss_enabled and self.compute_loss_func is None
                    and self.label_smoother is None and self.accelerator.num_processes == 1
                    and _plain_logits(_causal_lm(self.accelerator.unwrap_model(self.model))))

    @functools.cached_property
    def _logprob_kernel(self) -> tuple[Any, int]:
        """TRL's kernel and the chunk size its own forward gives it, looked up at the first micro-batch."""
        return (internal("trl.kernels", "ChunkedLogProbFunction"),
                internal("trl.trainer.utils", "_CHUNKED_LOGPROB_CHUNK_SIZE"))

    def _fused_head_loss(self, model: Any, inputs: Any, positions: Any, num_items_in_batch: Any) -> Any:
        # TRL's own fused forward picks the labelled positions on the GPU with boolean masks, and
        # each pick (two in forward, two in backward) makes the host wait for the GPU.
        causal_lm = _causal_lm(self.accelerator.unwrap_model(model))
        features = {k: v for k, v in inputs.items() if k != "labels"}
        head = causal_lm.get_output_embeddings()
        kernel, chunk_size = self._logprob_kernel
        with self.accelerator.autocast():  # as the model's own forward runs under mixed precision
            hidden = getattr(causal_lm, causal_lm.base_model_prefix)(**features, use_cache=False)
            hidden = hidden.last_hidden_state
            log_probs, entropy, _, _, is_top1 = kernel.apply(
                hidden.reshape(-1, hidden.shape[-1]).index_select(0, positions), head.weight, head.bias,
                inputs["labels"].reshape(-1).index_select(0, positions + 1), 1.0,
                chunk_size, None, 1.0, ("log_probs", "entropy", "is_top1"))
        labelled = max(len(positions), 1)
        num = labelled if num_items_in_batch is None else torch.as_tensor(num_items_in_batch).clamp(min=1)
        loss = -log_probs.sum() / num
        self._metrics["train"]["entropy"].append(entropy.detach().sum() / labelled)
        self._metrics["train"]["mean_token_accuracy"].append(is_top1.sum() / labelled)
        return loss

    def floating_point_ops(self, inputs: Any) -> int:
        # Trainer recounts the parameters (a walk over every module) on each micro-batch for its
        # FLOPs log; the count does not change during training.
        if not hasattr(self, "_flops_params"):
            self._flops_params = super().floating_point_ops({"input_ids": torch.empty(1)})
        return int(self._flops_params * inputs["input_ids"].numel())

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        for values in self._metrics["train"].values():  # one read from the GPU per logging step
            if values and isinstance(values[0], torch.Tensor):
                values[:] = torch.stack(values).tolist()
        super().log(logs, start_time)
