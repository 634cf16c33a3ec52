"""LoRA supervised fine-tuning with TRL's SFTTrainer: the training recipe, top to bottom.

    backend -> batch split -> model -> data -> trainer config -> trainer -> resume -> train -> save -> result [-> then]

It reads the splits from one folder and writes the adapter, tokenizer, training curve and summary
to another, so the same code runs in the DAG's train task (as a child process), from
`python -m ml train`, or alone on a GPU box. It imports neither Airflow nor MLflow.

Enter through `ml.backend.train_here`, which imports Unsloth first when it is the backend. The
speed work, which changes no update, lives in ml/speed.py, switched on by config. Checkpoints go
to `<out>/checkpoints` every `train.save_steps`; a rerun (an Airflow retry) resumes from the last.

Started by torchrun as one of several processes (`train.num_processes`, ml/distributed.py), it trains
its share of each optimizer step; every process takes part in training and in the final evaluation,
and only the main one (rank 0) writes anything and runs `then`.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from datasets import Dataset
from transformers import PrinterCallback, TrainerCallback
from trl import SFTConfig

from ml import distributed, speed
from ml.backend import pick_backend
from ml.config import PipelineConfig
from ml.data import read_split
from ml.errors import DataError, TrainingDiverged
from ml.modeling import load_for_training
from ml.prompt import IGNORE_INDEX, Encoded, PromptFormat, encode_all
from ml.runs import TrainFiles, write_json

if TYPE_CHECKING:
    from transformers import PreTrainedModel as Model
    from transformers import PreTrainedTokenizerBase as Tokenizer

log = logging.getLogger(__name__)


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
    tokens_per_s: float | None = None  # non-padding tokens per second of every process, after the first steps
    step_s: float | None = None  # median optimizer-step time, after the first steps
    peak_gpu_gib: float | None = None
    uncheckpointed_layers: int | None = None  # the layout trained with (train.uncheckpointed_layers resolved)
    planned_peak_gib: float | None = None  # the planner's estimate of peak_gpu_gib
    num_processes: int = 1  # data-parallel processes that trained (train.num_processes resolved)
    per_device_batch: int | None = None  # examples per micro-batch of one process
    accumulation: int | None = None  # micro-batches per optimizer step of one process
    examples_per_step: int | None = None  # per_device_batch x accumulation x num_processes, as configured

    @classmethod
    def read(cls, out_dir: Path) -> TrainResult:
        return cls(**json.loads(TrainFiles(out_dir).result.read_text()))


def finetune(cfg: PipelineConfig, splits_dir: Path, out_dir: Path, callbacks: Sequence[Any] = (),
          then: Callable[[Model, Tokenizer], None] | None = None) -> TrainResult:
    """Fine-tune a LoRA adapter on `splits_dir/train.jsonl`; write everything to `out_dir`.

    `callbacks`: extra transformers `TrainerCallback`s (benchmarks use them to profile).
    `then(model, tokenizer)`: runs once everything is written, with the trained model still loaded.
    """
    t0, t, files = time.perf_counter(), cfg.train, TrainFiles(out_dir)
    backend, cuda = pick_backend(t.backend), torch.cuda.is_available()
    split = distributed.split_batch(t.per_device_train_batch_size, t.gradient_accumulation_steps,
                                    distributed.world_size())
    log.info("backend=%s base_model=%s lr=%g steps=%d batch: %s", backend, cfg.model.base_model,
             t.learning_rate, t.max_steps, split.describe())
    out_dir.mkdir(parents=True, exist_ok=True)
    distributed.use_own_device()
    speed.cap_gpu_memory(t.gpu_memory_fraction)  # before the model: the planner plans within the cap

    model, tokenizer, peft_config = load_for_training(cfg, backend)
    loss_head = speed.resolve_loss_head(t.loss_head, cuda, split.processes)
    layout = speed.plan_activations(  # before the data and the trainer: a plan that does not fit fails here
        t.uncheckpointed_layers, model=model, backend=backend, checkpointing=t.gradient_checkpointing,
        batch_size=split.per_device_batch, max_seq_length=cfg.model.max_seq_length,
        pad_to_multiple_of=t.pad_to_multiple_of, optim=t.optim, loss_head=loss_head, fraction=t.gpu_memory_fraction)
    log.info("activation layout: %s", layout.reason)
    if distributed.is_main():  # the train step logs it as the run's params, with the backend and the batch split
        write_json(files.layout, {**asdict(layout), "backend": backend, **asdict(split),
                                  "examples_per_step": split.examples_per_step})
    speed.warn_padding_free(t.padding_free, model)

    fmt = PromptFormat.from_config(cfg)
    train_rows = encode_all(tokenizer, read_split(splits_dir, "train"), fmt)
    eval_rows = encode_all(tokenizer, read_split(splits_dir, "validation"), fmt)
    if not any(label != IGNORE_INDEX for e in train_rows for label in e.labels):
        raise DataError(f"no training example keeps an answer token within model.max_seq_length="
                        f"{cfg.model.max_seq_length}: raise it, or shorten the prompts")
    truncated = sum(e.truncated for e in train_rows)
    if truncated:
        log.warning("%d of %d training examples exceed max_seq_length=%d and lose part of their answer",
                    truncated, len(train_rows), cfg.model.max_seq_length)

    args = sft_config(cfg, backend, out_dir, cuda, split=split, evaluate=bool(eval_rows))

    log.info("loss: %s", {"trl": "TRL's fused LM head", "model": "the model's own forward with labels"}[loss_head])
    checkpointing = speed.selective_checkpointing(layout.uncheckpointed_layers, t.gradient_checkpointing, backend)
    trainer = speed.ProjectSFTTrainer(
        model=model, args=args, train_dataset=_dataset(train_rows),
        eval_dataset=_dataset(eval_rows) if eval_rows else None, processing_class=tokenizer,
        peft_config=peft_config, callbacks=[*checkpointing, *callbacks], loss_head=loss_head)
    trainer.data_collator = counter = speed.HostCollator(trainer.data_collator, label_positions=loss_head == "trl",
                                                         blank_token=tokenizer.pad_token_id)
    meter = speed.SpeedMeter(counter, split.processes)
    trainer.add_callback(meter)
    trainer.add_callback(MetricsFile(files.metrics))  # rank 0's, read live by the task that supervises
    trainer.add_callback(FiniteLoss())  # after MetricsFile: the diverged record is still relayed
    trainer.remove_callback(PrinterCallback)  # the meter logs the same, readably
    trainable, total = trainer.model.get_nb_trainable_parameters()
    log.info("backend %s: LoRA trains %s of %s parameters (%.3f%%)", backend, f"{trainable:,}", f"{total:,}",
             100 * trainable / total)

    resume = last_checkpoint(out_dir)
    if resume:
        log.info("resuming from %s", resume.name)

    output = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    eval_loss = final_eval_loss(trainer) if eval_rows else None  # every process: an evaluation is collective
    tokens_per_s = meter.tokens_per_s(distributed.sum_over_processes)  # every process's tokens

    trainer.save_model(str(files.adapter))  # rank 0 writes (Trainer's should_save)
    result = TrainResult(
        str(files.adapter), backend, trainer.state.global_step, float(output.training_loss), eval_loss,
        time.perf_counter() - t0, len(train_rows), truncated, str(files.history),
        int(resume.name.rsplit("-", 1)[1]) if resume else None, tokens_per_s, meter.step_s(),
        speed.peak_gpu_gib(), layout.uncheckpointed_layers, layout.planned_peak_gib, split.processes,
        split.per_device_batch, split.accumulation, split.examples_per_step)
    if not distributed.is_main():  # its share is trained: the main process writes, and runs `then`
        return result

    tokenizer.save_pretrained(str(files.adapter))
    files.history.write_text(json.dumps(trainer.state.log_history, indent=1))
    write_json(files.result, asdict(result))  # whole or not at all: a retry reads it (finished_training)
    shutil.rmtree(files.checkpoints, ignore_errors=True)  # the adapter is written: no retry needs them
    log.info("trained %d steps in %.1fs: train_loss=%.4f eval_loss=%s", result.global_step,
             result.runtime_s, result.train_loss, result.eval_loss)

    if then is not None:  # e.g. scoring the test split without loading the base model again (ml/scoring.py)
        then(trainer.model, tokenizer)
    return result


class MetricsFile(TrainerCallback):  # type: ignore[misc]
    """Every logged record (loss, learning rate, grad norm, validation loss) as a JSON line with its
    step and wall-clock time, appended as training goes: what the supervising task relays to MLflow
    while the trainer runs (the trainer itself imports no MLflow)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        if distributed.is_main():
            path.unlink(missing_ok=True)  # a resumed attempt rewrites its own

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
        if not state.is_world_process_zero:  # the same records in every process: rank 0 writes them
            return
        record = {k: v for k, v in (logs or {}).items() if isinstance(v, (int, float))}
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps({"step": state.global_step, "time": time.time(), **record}) + "\n")


class FiniteLoss(TrainerCallback):  # type: ignore[misc]
    """Stops a training whose logged loss is NaN or infinite (a learning rate too high, say): its
    weights are garbage from then on, and no checkpoint, adapter or version may come of it. Raised
    at the log, before the step's checkpoint is saved."""

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
        logs = logs or {}
        for key in ("loss", "eval_loss"):
            value = logs.get(key)
            if isinstance(value, (int, float)) and not math.isfinite(value):
                now = float(logs.get("learning_rate", args.learning_rate))
                raise TrainingDiverged(
                    f"training diverged: {key} is {value} at step {state.global_step} of {state.max_steps} "
                    f"(learning rate {now:g}; train.learning_rate {args.learning_rate:g}): nothing is saved or "
                    "registered; lower train.learning_rate")


def _dataset(rows: list[Encoded]) -> Dataset:
    return Dataset.from_list([{"input_ids": e.input_ids, "labels": e.labels} for e in rows])


def sft_config(cfg: PipelineConfig, backend: str, out_dir: Path, cuda: bool,
               split: distributed.BatchSplit | None = None, evaluate: bool = True) -> SFTConfig:
    """The trainer's arguments; `split`: how the processes share each optimizer step (None: one process)."""
    t = cfg.train
    split = split or distributed.split_batch(t.per_device_train_batch_size, t.gradient_accumulation_steps, 1)
    optim = t.optim
    if not cuda and "8bit" in optim:
        log.info("optimizer %s needs CUDA; using adamw_torch on the CPU", optim)
        optim = "adamw_torch"
    bf16 = cuda and torch.cuda.is_bf16_supported()
    return SFTConfig(
        **({} if t.padding_free is None else {"padding_free": t.padding_free}),
        output_dir=str(TrainFiles(out_dir).checkpoints), save_strategy="steps", save_steps=t.save_steps,
        save_total_limit=2,
        per_device_train_batch_size=split.per_device_batch, per_device_eval_batch_size=cfg.eval.batch_size,
        gradient_accumulation_steps=split.accumulation, max_steps=t.max_steps,
        num_train_epochs=t.num_train_epochs, learning_rate=t.learning_rate, lr_scheduler_type=t.lr_scheduler_type,
        warmup_steps=t.warmup_ratio if t.warmup_ratio > 0 else t.warmup_steps,  # a float < 1 is a ratio
        optim=optim, weight_decay=t.weight_decay, seed=t.seed, data_seed=t.seed, bf16=bf16, fp16=cuda and not bf16,
        logging_steps=t.logging_steps, report_to="none", disable_tqdm=True,
        eval_strategy="steps" if evaluate else "no", eval_steps=cfg.eval.eval_steps,
        # Unsloth checkpoints its own way (set in get_peft_model); hf uses transformers'.
        gradient_checkpointing=backend == "hf" and t.gradient_checkpointing != "false",
        gradient_checkpointing_kwargs={"use_reentrant": False},
        max_length=cfg.model.max_seq_length, pad_to_multiple_of=t.pad_to_multiple_of, packing=t.packing,
        train_sampling_strategy="group_by_length" if t.group_by_length else "random",
        dataloader_num_workers=0, **speed.loop_args(cuda),
        use_cpu=not cuda,  # accelerate sets up several processes on the CPU (gloo) only when told it is the CPU
        # Several processes: every trainable (LoRA) weight gets a gradient at every step, so DDP need not look
        # for unused ones (transformers would have it look for a peft model: a walk of the graph per step).
        ddp_find_unused_parameters=False)


def last_checkpoint(out_dir: Path) -> Path | None:
    """The newest complete checkpoint (trainer_state.json is written last), if any."""
    folder = TrainFiles(out_dir).checkpoints
    done = [p for p in folder.glob("checkpoint-*") if (p / "trainer_state.json").exists()] if folder.is_dir() else []
    return max(done, key=lambda p: int(p.name.rsplit("-", 1)[1]), default=None)


def final_eval_loss(trainer: Any) -> float | None:
    """Validation loss of the final weights: the last periodic evaluation if it ran at the last step."""
    evals = [r for r in trainer.state.log_history if "eval_loss" in r]
    if evals and evals[-1]["step"] == trainer.state.global_step:
        return float(evals[-1]["eval_loss"])
    metrics = trainer.evaluate()
    if "eval_loss" not in metrics:  # every validation answer was cut off at max_seq_length
        log.warning("no validation loss: no validation row has an answer token within max_seq_length")
        return None
    return float(metrics["eval_loss"])
