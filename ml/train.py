"""LoRA supervised fine-tuning with TRL's SFTTrainer, on Unsloth or plain transformers + peft.

Imports neither Airflow nor MLflow: it reads splits from a folder and writes
the adapter, tokenizer, training curve and summary to another, so the same
code runs inside a DAG task's child process, from `python -m ml train`, or
alone on a GPU box.

Backends (config `train.backend`):
  unsloth  Unsloth FastLanguageModel (4-bit), its LoRA and gradient checkpointing
  hf       transformers + peft, bitsandbytes NF4 when on CUDA; the CPU path
  auto     unsloth when CUDA and Unsloth are importable, else hf

Checkpoints are written every `train.save_steps` to `<out>/checkpoints`; a
rerun of the same run (an Airflow retry) resumes from the last one.
"""

from __future__ import annotations

import functools
import json
import logging
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ml.config import PipelineConfig
from ml.data import read_split
from ml.prompt import PromptFormat, encode_all

log = logging.getLogger(__name__)

WARMUP_STEPS_UNTIMED = 2  # first steps compile kernels and warm allocators; not counted in speed
LABEL_POSITIONS = "label_positions"  # batch key of HostCollator's loss positions


@dataclass(frozen=True)
class TrainResult:
    adapter_dir: str
    backend: str
    global_step: int
    train_loss: float
    eval_loss: float | None
    runtime_s: float
    train_examples: int
    truncated_examples: int
    log_history: str  # path of the per-step metrics (JSON list)
    resumed_from_step: int | None = None
    tokens_per_s: float | None = None  # non-padding tokens per second, after the first steps
    step_s: float | None = None  # median optimizer-step time, after the first steps
    peak_gpu_gib: float | None = None

    @classmethod
    def read(cls, out_dir: Path) -> TrainResult:
        return cls(**json.loads((out_dir / "train_result.json").read_text()))


def pick_backend(requested: str) -> str:
    if requested != "auto":
        return requested
    import torch

    if not torch.cuda.is_available():
        return "hf"
    try:
        import unsloth  # noqa: F401  (must come before transformers in this process)
    except ImportError:
        return "hf"
    return "unsloth"


class HostCollator:
    """Wraps the data collator: what the loop needs to know of a batch, read on the host as it is built.

    The non-padding tokens (throughput) and, with `label_positions`, where the loss is taken:
    the flat index (row x length + column) of each position whose next token is labelled.
    Read from the GPU instead, each costs a wait for all queued GPU work, once per micro-batch.
    """

    def __init__(self, collate: Any, label_positions: bool = False) -> None:
        self.collate = collate
        self.label_positions = label_positions
        self.tokens = 0

    def __call__(self, features: Any) -> Any:
        batch = self.collate(features)
        mask = batch.get("attention_mask")
        self.tokens += int(mask.sum()) if mask is not None else int(batch["input_ids"].numel())
        if self.label_positions:
            labels = batch["labels"]
            rows, cols = (labels[:, 1:] != -100).nonzero(as_tuple=True)
            batch[LABEL_POSITIONS] = rows * labels.shape[1] + cols
        return batch


def _speed_callback(counter: HostCollator) -> Any:
    from transformers import TrainerCallback

    class Speed(TrainerCallback):  # type: ignore[misc]
        """Logs step, loss, tokens/s and GPU memory each logging step; keeps timings for the result.

        Evaluation and checkpoint saving are paused out: the speed is the training loop's.
        """

        def __init__(self) -> None:
            self.marks: list[tuple[int, float, int]] = []  # (step, training time, training tokens)
            self.t0 = self.last = time.perf_counter()
            self.last_tokens = 0
            self.paused_s, self.paused_tokens = 0.0, 0

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.last, self.last_tokens = time.perf_counter(), counter.tokens
            self.marks.append((state.global_step, self.last - self.paused_s, self.last_tokens - self.paused_tokens))

        def _pause(self) -> None:
            now = time.perf_counter()
            self.paused_s += now - self.last
            self.paused_tokens += counter.tokens - self.last_tokens
            self.last, self.last_tokens = now, counter.tokens

        def on_evaluate(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self._pause()

        def on_save(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self._pause()

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
            logs = logs or {}
            parts = [f"step {state.global_step}/{state.max_steps}"]
            for key in ("loss", "eval_loss", "learning_rate", "grad_norm"):
                if key in logs:
                    parts.append(f"{key}={logs[key]:.4g}")
            speed = self.tokens_per_s()
            if speed:
                parts.append(f"tokens/s={speed:.0f}")
            gib = peak_gpu_gib()
            if gib is not None:
                parts.append(f"gpu_mem_peak={gib:.1f}GiB")
            parts.append(f"elapsed={time.perf_counter() - self.t0:.1f}s")
            log.info(" ".join(parts))

        def _timed(self) -> list[tuple[int, float, int]]:
            return self.marks[WARMUP_STEPS_UNTIMED:] if len(self.marks) > WARMUP_STEPS_UNTIMED + 1 else []

        def tokens_per_s(self) -> float | None:
            m = self._timed()
            return (m[-1][2] - m[0][2]) / (m[-1][1] - m[0][1]) if m and m[-1][1] > m[0][1] else None

        def step_s(self) -> float | None:
            m = self._timed()
            if not m:
                return None
            gaps = sorted(b[1] - a[1] for a, b in zip(m, m[1:], strict=False))
            return gaps[len(gaps) // 2] if gaps else None

    return Speed()


def _run_directly(function: Any, *args: Any, **kwargs: Any) -> Any:
    return function(*args, **kwargs)


def keep_activations(model: Any, num_layers: int) -> list[str]:
    """Selective activation checkpointing: the last `num_layers` decoder layers skip the recompute.

    Their checkpoint function becomes a plain call, so they keep their activations
    for the backward pass whatever the checkpointing flags say (Unsloth re-sets
    those on every `train()`). Returns the names of the layers changed.
    """
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, GradientCheckpointingLayer)]
    chosen = layers[len(layers) - min(num_layers, len(layers)):] if num_layers else []
    for _, layer in chosen:
        layer._gradient_checkpointing_func = _run_directly
    return [n for n, _ in chosen]


def _selective_checkpointing_callback(num_layers: int) -> Any:
    from transformers import TrainerCallback

    class SelectiveCheckpointing(TrainerCallback):  # type: ignore[misc]
        # At train begin: the model is final by then, so nothing re-installs the functions after us.
        def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
            names = keep_activations(model, num_layers)
            log.info("selective checkpointing: %d decoder layers keep their activations (%s .. %s)",
                     len(names), names[0] if names else "-", names[-1] if names else "-")

    return SelectiveCheckpointing()


def peak_gpu_gib() -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


def _causal_lm(model: Any) -> Any:
    """The causal LM inside a peft wrapper (with its LoRA layers), or the model itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _plain_logits(causal_lm: Any) -> bool:
    """Log-probs straight from the LM head: no logit scaling or softcapping (Llama, Qwen, EXAONE)."""
    text = causal_lm.config.get_text_config()
    return all(getattr(text, key, None) is None for key in (
        "final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling"))


def _sft_trainer_cls(loss_head: str) -> Any:
    import torch
    from transformers import Trainer
    from trl import SFTTrainer  # Unsloth, when imported first, has patched this class

    class ProjectSFTTrainer(SFTTrainer):  # type: ignore[misc]
        """SFTTrainer whose loss runs where `train.loss_head` says.

        "trl": TRL's fused LM head (a Triton kernel, so CUDA only). "model": the
        model's own forward with labels, as `Trainer` does: the same per-token NLL
        over the same labels, minus TRL's entropy and token-accuracy logs.
        """

        def compute_loss(self, model: Any, inputs: Any, return_outputs: bool = False,
                         num_items_in_batch: Any = None) -> Any:
            positions = inputs.pop(LABEL_POSITIONS, None)
            if loss_head == "model":
                return Trainer.compute_loss(self, model, inputs, return_outputs, num_items_in_batch)
            if (return_outputs or not model.training or positions is None or "shift_labels" in inputs
                    or not self._plain_nll_setup):
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            return self._fused_head_loss(model, inputs, positions, num_items_in_batch)

        @functools.cached_property
        def _plain_nll_setup(self) -> bool:
            # Fixed for a trainer, so read once rather than on every micro-batch: a plain
            # next-token NLL in one process on a model whose log-probs come straight from its head.
            return bool(self.args.loss_type == "nll" and not self.aux_loss_enabled and self.compute_loss_func is None
                        and self.label_smoother is None and self.accelerator.num_processes == 1
                        and _plain_logits(_causal_lm(self.accelerator.unwrap_model(self.model))))

        def _fused_head_loss(self, model: Any, inputs: Any, positions: Any, num_items_in_batch: Any) -> Any:
            # TRL's fused LM head kernel on the labelled positions, found on the host
            # (HostCollator). TRL's own forward picks them on the GPU with boolean masks, and
            # each pick (two forward, two in the backward) makes the host wait for the GPU, in
            # a loop that the host paces at the seed's shape. Its entropy and token-accuracy
            # metrics stay on the device until a logging step (TRL reads them every micro-batch).
            from trl.kernels import ChunkedLogProbFunction
            from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE

            causal_lm = _causal_lm(self.accelerator.unwrap_model(model))
            features = {k: v for k, v in inputs.items() if k != "labels"}
            head = causal_lm.get_output_embeddings()
            with self.accelerator.autocast():  # as the model's own forward runs under mixed precision
                hidden = getattr(causal_lm, causal_lm.base_model_prefix)(**features, use_cache=False)
                hidden = hidden.last_hidden_state
                log_probs, entropy, _, _, is_top1 = ChunkedLogProbFunction.apply(
                    hidden.reshape(-1, hidden.shape[-1]).index_select(0, positions), head.weight, head.bias,
                    inputs["labels"].reshape(-1).index_select(0, positions + 1), 1.0,
                    _CHUNKED_LOGPROB_CHUNK_SIZE, None, 1.0, ("log_probs", "entropy", "is_top1"))
            labelled = max(len(positions), 1)
            num = labelled if num_items_in_batch is None else torch.as_tensor(num_items_in_batch).clamp(min=1)
            loss = -log_probs.sum() / num
            self._metrics["train"]["entropy"].append(entropy.detach().sum() / labelled)
            self._metrics["train"]["mean_token_accuracy"].append(is_top1.sum() / labelled)
            return loss

        def floating_point_ops(self, inputs: Any) -> int:
            # Trainer recounts the parameters (a walk over every module) on each micro-batch
            # for its FLOPs log; the count does not change during training.
            if not hasattr(self, "_flops_params"):
                self._flops_params = super().floating_point_ops({"input_ids": torch.empty(1)})
            return int(self._flops_params * inputs["input_ids"].numel())

        def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
            for values in self._metrics["train"].values():  # one read per logging step
                if values and isinstance(values[0], torch.Tensor):
                    values[:] = torch.stack(values).tolist()
            super().log(logs, start_time)

    return ProjectSFTTrainer


def resolve_loss_head(requested: str, cuda: bool) -> str:
    """"auto": TRL's fused head wherever its Triton kernel runs (CUDA), the model's own loss elsewhere."""
    if requested == "trl" and not cuda:
        log.warning("train.loss_head=trl needs CUDA (TRL's head is a Triton kernel); using the model's own loss")
    if requested == "model" or not cuda:
        return "model"
    return "trl"


def _sft_args(cfg: PipelineConfig, backend: str, out_dir: Path, cuda: bool, bf16: bool,
              evaluate: bool = True) -> Any:
    from trl import SFTConfig

    t = cfg.train
    optim = t.optim
    if not cuda and "8bit" in optim:
        log.info("optimizer %s needs CUDA; using adamw_torch on the CPU", optim)
        optim = "adamw_torch"
    optional = {} if t.padding_free is None else {"padding_free": t.padding_free}
    return SFTConfig(
        **optional,
        output_dir=str(out_dir / "checkpoints"),
        per_device_train_batch_size=t.per_device_train_batch_size,
        per_device_eval_batch_size=cfg.eval.batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        warmup_steps=t.warmup_ratio if t.warmup_ratio > 0 else t.warmup_steps,
        max_steps=t.max_steps,
        num_train_epochs=t.num_train_epochs,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler_type,
        optim=optim,
        weight_decay=t.weight_decay,
        seed=t.seed,
        data_seed=t.seed,
        logging_steps=t.logging_steps,
        eval_strategy="steps" if evaluate else "no",  # no validation rows (data.val_fraction 0): no eval
        eval_steps=cfg.eval.eval_steps,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=2,
        report_to="none",
        bf16=cuda and bf16,
        fp16=cuda and not bf16,
        # Unsloth checkpoints its own way (set in get_peft_model); hf uses transformers'.
        gradient_checkpointing=backend == "hf" and t.gradient_checkpointing != "false",
        gradient_checkpointing_kwargs={"use_reentrant": False},
        max_length=cfg.model.max_seq_length,
        pad_to_multiple_of=t.pad_to_multiple_of,
        packing=t.packing,
        train_sampling_strategy="group_by_length" if t.group_by_length else "random",
        # Both cost a device->host sync per micro-batch: tokens are counted on the host
        # (HostCollator), and a NaN/inf loss is logged as it is rather than replaced.
        include_num_input_tokens_seen="no",
        logging_nan_inf_filter=False,
        # A plain copy of a batch to the GPU waits for all queued GPU work first; from pinned
        # memory it can run non-blocking, so the host goes on queueing the next micro-batch.
        dataloader_pin_memory=cuda,
        accelerator_config={"non_blocking": cuda},
        dataloader_num_workers=0,
        disable_tqdm=True,
    )


def lora_config(cfg: PipelineConfig, num_layers: int) -> Any:
    from peft import LoraConfig

    lc = cfg.lora
    return LoraConfig(
        r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout, bias=lc.bias,
        target_modules=list(lc.target_modules), layers_to_transform=_layers(cfg, num_layers),
        modules_to_save=["lm_head"] if lc.train_lm_head else None, task_type="CAUSAL_LM")


def _layers(cfg: PipelineConfig, num_layers: int) -> list[int] | None:
    if not cfg.lora.top_k_layers:
        return None
    k = min(cfg.lora.top_k_layers, num_layers)
    return list(range(num_layers - k, num_layers))


def _load_hf(cfg: PipelineConfig) -> tuple[Any, Any, Any]:
    """(model, tokenizer, peft_config): TRL wraps the model in LoRA (and prepares 4-bit) itself."""
    from ml.modeling import load_base_model, load_tokenizer

    tokenizer = load_tokenizer(cfg.model)
    model = load_base_model(cfg.model)
    if cfg.train.gradient_checkpointing != "false" and getattr(model, "is_loaded_in_4bit", False):
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    return model, tokenizer, lora_config(cfg, model.config.num_hidden_layers)


def _load_unsloth(cfg: PipelineConfig) -> tuple[Any, Any, Any]:
    """(model, tokenizer, None): Unsloth's 4-bit model, already wrapped in its LoRA."""
    import unsloth  # noqa: F401  (before transformers)
    from unsloth import FastLanguageModel

    from ml.modeling import model_ref

    lc, t = cfg.lora, cfg.train
    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=model_ref(cfg.model.base_model), revision=cfg.model.revision,
        max_seq_length=cfg.model.max_seq_length, dtype=None, load_in_4bit=cfg.model.load_in_4bit)
    checkpointing = {"unsloth": "unsloth", "true": True, "false": False}[t.gradient_checkpointing]
    model = FastLanguageModel.get_peft_model(
        model, r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout, bias=lc.bias,
        target_modules=list(lc.target_modules), use_gradient_checkpointing=checkpointing,
        random_state=t.seed, layers_to_transform=_layers(cfg, model.config.num_hidden_layers),
        modules_to_save=["lm_head"] if lc.train_lm_head else None)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer, None


def last_checkpoint(out_dir: Path) -> Path | None:
    """The newest complete checkpoint (trainer_state.json is written last), if any."""
    folder = out_dir / "checkpoints"
    done = [p for p in folder.glob("checkpoint-*") if (p / "trainer_state.json").exists()] if folder.is_dir() else []
    return max(done, key=lambda p: int(p.name.rsplit("-", 1)[1]), default=None)


def _train(cfg: PipelineConfig, backend: str, splits_dir: Path, out_dir: Path,
           callbacks: Sequence[Any] = ()) -> TrainResult:
    import torch
    from datasets import Dataset
    from transformers import PrinterCallback

    t0 = time.perf_counter()
    cuda = torch.cuda.is_available()
    bf16 = cuda and torch.cuda.is_bf16_supported()
    model, tokenizer, peft_config = (_load_unsloth if backend == "unsloth" else _load_hf)(cfg)
    fmt = PromptFormat.from_config(cfg)

    def tokenized(name: str) -> tuple[Any, int, int]:
        enc = encode_all(tokenizer, read_split(splits_dir, name), fmt)
        rows = [{"input_ids": e.input_ids, "labels": e.labels} for e in enc]
        return Dataset.from_list(rows), len(enc), sum(e.truncated for e in enc)

    train_ds, n_train, n_trunc = tokenized("train")
    eval_ds, n_eval, _ = tokenized("validation")
    if n_trunc:
        log.warning("%d of %d training examples exceed max_seq_length=%d and lose part of their answer",
                    n_trunc, n_train, cfg.model.max_seq_length)

    loss_head = resolve_loss_head(cfg.train.loss_head, cuda)
    log.info("loss: %s", {"trl": "TRL's fused LM head", "model": "the model's own forward with labels"}[loss_head])
    extra = []
    if cfg.train.uncheckpointed_layers and cfg.train.gradient_checkpointing != "false":
        if backend == "unsloth":
            extra.append(_selective_checkpointing_callback(cfg.train.uncheckpointed_layers))
        else:  # measured on an H100: 12 kept layers took the hf backend from 8.5 to 16.7 GiB on 2k tokens
            log.info("train.uncheckpointed_layers=%d is for the unsloth backend; the hf backend keeps ~3x "
                     "more activations per layer, so it checkpoints every layer", cfg.train.uncheckpointed_layers)
    trainer = _sft_trainer_cls(loss_head)(
        model=model, args=_sft_args(cfg, backend, out_dir, cuda, bf16, n_eval > 0), train_dataset=train_ds,
        eval_dataset=eval_ds if n_eval else None, processing_class=tokenizer,
        peft_config=peft_config, callbacks=[*extra, *callbacks])
    trainer.data_collator = counter = HostCollator(trainer.data_collator, label_positions=loss_head == "trl")
    speed = _speed_callback(counter)
    trainer.add_callback(speed)
    trainer.remove_callback(PrinterCallback)  # the Speed callback logs the same, readably
    trainable, total = trainer.model.get_nb_trainable_parameters()
    log.info("backend %s: LoRA trains %s of %s parameters (%.3f%%)", backend, f"{trainable:,}", f"{total:,}",
             100 * trainable / total)
    resume = last_checkpoint(out_dir)
    if resume:
        log.info("resuming from %s", resume.name)
    output = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    evals = [r for r in trainer.state.log_history if "eval_loss" in r]
    eval_loss = None
    if n_eval:  # the last periodic eval counts only if it ran on the final weights
        last = evals[-1] if evals and evals[-1]["step"] == trainer.state.global_step else None
        eval_loss = float(last["eval_loss"]) if last else float(trainer.evaluate()["eval_loss"])

    adapter_dir = out_dir / "adapter"
    trainer.save_model(str(adapter_dir))
    tokenizer.save_pretrained(str(adapter_dir))
    history = out_dir / "log_history.json"
    history.write_text(json.dumps(trainer.state.log_history, indent=1))
    resumed_step = int(resume.name.rsplit("-", 1)[1]) if resume else None
    return TrainResult(str(adapter_dir), backend, trainer.state.global_step, float(output.training_loss),
                       eval_loss, time.perf_counter() - t0, n_train, n_trunc, str(history), resumed_step,
                       speed.tokens_per_s(), speed.step_s(), peak_gpu_gib())


def train(cfg: PipelineConfig, splits_dir: Path, out_dir: Path, callbacks: Sequence[Any] = ()) -> TrainResult:
    """Fine-tune a LoRA adapter on `splits_dir/train.jsonl`; write everything to `out_dir`.

    `callbacks`: extra transformers `TrainerCallback`s (benchmarks use them to profile).
    """
    backend = pick_backend(cfg.train.backend)
    if backend not in ("hf", "unsloth"):
        raise ValueError(f"unknown training backend {backend!r}")
    log.info("backend=%s base_model=%s lr=%g steps=%d batch=%dx%d", backend, cfg.model.base_model,
             cfg.train.learning_rate, cfg.train.max_steps, cfg.train.per_device_train_batch_size,
             cfg.train.gradient_accumulation_steps)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = _train(cfg, backend, splits_dir, out_dir, callbacks)
    (out_dir / "train_result.json").write_text(json.dumps(asdict(result), indent=2))
    # The adapter is safely written: the intermediate checkpoints have served their purpose.
    shutil.rmtree(out_dir / "checkpoints", ignore_errors=True)
    log.info("trained %d steps in %.1fs: train_loss=%.4f eval_loss=%s", result.global_step,
             result.runtime_s, result.train_loss, result.eval_loss)
    return result
