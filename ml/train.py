"""LoRA supervised fine-tuning with TRL's SFTTrainer.

Imports neither Airflow nor MLflow: it reads splits from a folder and writes
the adapter, tokenizer, training curve and summary to another, so the same
code runs inside a DAG task, from `python -m ml train`, or alone on a GPU box.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ml.config import PipelineConfig
from ml.data import read_split
from ml.prompt import PromptFormat, encode_all

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

    @classmethod
    def read(cls, out_dir: Path) -> TrainResult:
        return cls(**json.loads((out_dir / "train_result.json").read_text()))


def pick_backend(requested: str) -> str:
    if requested != "auto":
        return requested
    import torch

    if torch.cuda.is_available():
        try:
            import unsloth  # noqa: F401
        except ImportError:
            return "hf"
        return "unsloth"
    return "hf"


def _progress_callback() -> Any:
    from transformers import TrainerCallback

    class Progress(TrainerCallback):  # type: ignore[misc]
        """One readable line per logging step in the task log: step, loss, speed."""

        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.t0 = time.perf_counter()
            log.info("training for %d steps", state.max_steps)

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
            logs = logs or {}
            elapsed = time.perf_counter() - self.t0
            parts = [f"step {state.global_step}/{state.max_steps}"]
            for key in ("loss", "eval_loss", "learning_rate", "grad_norm"):
                if key in logs:
                    parts.append(f"{key}={logs[key]:.4g}")
            if state.num_input_tokens_seen:
                parts.append(f"tokens/s={state.num_input_tokens_seen / max(elapsed, 1e-9):.0f}")
            parts.append(f"elapsed={elapsed:.1f}s")
            log.info(" ".join(parts))

    return Progress()


def _sft_trainer_cls() -> Any:
    from transformers import Trainer
    from trl import SFTTrainer

    class PortableSFTTrainer(SFTTrainer):  # type: ignore[misc]
        """SFTTrainer whose loss also runs where Triton cannot (the CPU).

        TRL computes the loss through a fused Triton LM-head kernel. On a CPU we
        fall back to the model's own cross-entropy over the same labels: the
        same per-token NLL, minus TRL's extra logging metrics.
        """

        def compute_loss(self, model: Any, inputs: Any, return_outputs: bool = False,
                         num_items_in_batch: Any = None) -> Any:
            if inputs["input_ids"].is_cuda:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            return Trainer.compute_loss(self, model, inputs, return_outputs, num_items_in_batch)

    return PortableSFTTrainer


def _sft_args(cfg: PipelineConfig, out_dir: Path, cuda: bool, bf16: bool) -> Any:
    from trl import SFTConfig

    t = cfg.train
    optim = t.optim
    if not cuda and "8bit" in optim:
        log.info("optimizer %s needs CUDA; using adamw_torch on the CPU", optim)
        optim = "adamw_torch"
    return SFTConfig(
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
        eval_strategy="steps",
        eval_steps=cfg.eval.eval_steps,
        save_strategy="no",
        report_to="none",
        bf16=cuda and bf16,
        fp16=cuda and not bf16,
        gradient_checkpointing=t.gradient_checkpointing != "false",
        max_length=cfg.model.max_seq_length,
        packing=t.packing,
        include_num_input_tokens_seen=True,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )


def lora_config(cfg: PipelineConfig, num_layers: int) -> Any:
    from peft import LoraConfig

    lc = cfg.lora
    layers = None
    if lc.top_k_layers:
        k = min(lc.top_k_layers, num_layers)
        layers = list(range(num_layers - k, num_layers))
    return LoraConfig(
        r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout, bias=lc.bias,
        target_modules=list(lc.target_modules), layers_to_transform=layers,
        modules_to_save=["lm_head"] if lc.train_lm_head else None, task_type="CAUSAL_LM")


def _train_hf(cfg: PipelineConfig, splits_dir: Path, out_dir: Path) -> TrainResult:
    import torch
    from datasets import Dataset
    from transformers import PrinterCallback

    from ml.modeling import load_base_model, load_tokenizer

    t0 = time.perf_counter()
    cuda = torch.cuda.is_available()
    bf16 = cuda and torch.cuda.is_bf16_supported()
    tokenizer = load_tokenizer(cfg.model)
    model = load_base_model(cfg.model)

    def tokenized(name: str) -> tuple[Any, int, int]:
        enc = encode_all(tokenizer, read_split(splits_dir, name), PromptFormat.from_config(cfg))
        rows = [{"input_ids": e.input_ids, "labels": e.labels} for e in enc]
        return Dataset.from_list(rows), len(enc), sum(e.truncated for e in enc)

    train_ds, n_train, n_trunc = tokenized("train")
    eval_ds, _, _ = tokenized("validation")
    if n_trunc:
        log.warning("%d of %d training examples exceed max_seq_length=%d and lose part of their answer",
                    n_trunc, n_train, cfg.model.max_seq_length)

    trainer = _sft_trainer_cls()(
        model=model, args=_sft_args(cfg, out_dir, cuda, bf16), train_dataset=train_ds,
        eval_dataset=eval_ds if len(eval_ds) else None, processing_class=tokenizer,
        peft_config=lora_config(cfg, model.config.num_hidden_layers), callbacks=[_progress_callback()])
    trainer.remove_callback(PrinterCallback)  # our Progress callback logs the same, readably
    trainable, total = trainer.model.get_nb_trainable_parameters()
    log.info("LoRA: %s trainable of %s parameters (%.3f%%)", f"{trainable:,}", f"{total:,}",
             100 * trainable / total)
    output = trainer.train()
    evals = [r for r in trainer.state.log_history if "eval_loss" in r]
    eval_loss = None
    if len(eval_ds):  # the last periodic eval counts only if it ran on the final weights
        last = evals[-1] if evals and evals[-1]["step"] == trainer.state.global_step else None
        eval_loss = float(last["eval_loss"]) if last else float(trainer.evaluate()["eval_loss"])

    adapter_dir = out_dir / "adapter"
    trainer.save_model(str(adapter_dir))
    tokenizer.save_pretrained(str(adapter_dir))
    history = out_dir / "log_history.json"
    history.write_text(json.dumps(trainer.state.log_history, indent=1))
    return TrainResult(str(adapter_dir), "hf", trainer.state.global_step, float(output.training_loss),
                       eval_loss, time.perf_counter() - t0, n_train, n_trunc, str(history))


def train(cfg: PipelineConfig, splits_dir: Path, out_dir: Path) -> TrainResult:
    """Fine-tune a LoRA adapter on `splits_dir/train.jsonl`; write everything to `out_dir`."""
    backend = pick_backend(cfg.train.backend)
    log.info("backend=%s base_model=%s lr=%g steps=%d", backend, cfg.model.base_model,
             cfg.train.learning_rate, cfg.train.max_steps)
    if backend != "hf":
        raise NotImplementedError(f"training backend {backend!r} is not available in this build; "
                                  "use train.backend: hf")
    out_dir.mkdir(parents=True, exist_ok=True)
    result = _train_hf(cfg, splits_dir, out_dir)
    (out_dir / "train_result.json").write_text(json.dumps(asdict(result), indent=2))
    log.info("trained %d steps in %.1fs: train_loss=%.4f eval_loss=%s", result.global_step,
             result.runtime_s, result.train_loss, result.eval_loss)
    return result
