"""The trainer's speed machinery (ml/speed.py) on the CPU: each part changes speed, never the maths;
and every TRL/transformers internal it relies on still exists in the installed versions."""

from __future__ import annotations

import json
import logging
import sys
import time
import types
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from conftest import trained_run as _trained
from datasets import Dataset
from peft import get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from ml import speed
from ml.config import load_config
from ml.modeling import load_for_training, lora_config
from ml.speed import (
    LABEL_POSITIONS,
    HostCollator,
    ProjectSFTTrainer,
    SelectiveCheckpointing,
    SpeedMeter,
    keep_activations,
    resolve_loss_head,
)
from ml.train import sft_config


def test_kept_layers_skip_the_recompute_and_give_the_same_gradients(tiny_model: Path) -> None:
    def step(keep: int) -> tuple[list[int], dict[str, torch.Tensor]]:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(tiny_model)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model = get_peft_model(model, lora_config(load_config("e2e"), model.config.num_hidden_layers))
        model.enable_input_require_grads()
        model.train()
        layers = list(model.base_model.model.model.layers)
        calls = [0] * len(layers)
        for i, layer in enumerate(layers):  # a pre-hook: the recompute stops early, before forward hooks
            layer.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
        assert len(keep_activations(model, keep)) == keep
        x = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
        model(input_ids=x, labels=x).loss.backward()
        return calls, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    all_checkpointed, grads = step(0)
    assert all_checkpointed == [2, 2]  # forward + recompute in the backward pass
    last_kept, grads_kept = step(1)
    assert last_kept == [2, 1]
    assert grads.keys() == grads_kept.keys()
    for name, g in grads.items():
        torch.testing.assert_close(grads_kept[name], g, msg=name)


def test_selective_checkpointing_is_applied_at_train_begin_and_only_by_unsloth(
        tiny_model: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    model.gradient_checkpointing_enable()  # as the Trainer does before on_train_begin
    with caplog.at_level(logging.INFO, logger="ml"):
        SelectiveCheckpointing(1).on_train_begin(None, None, None, model=model)
    first, last = model.model.layers
    assert last._gradient_checkpointing_func is not first._gradient_checkpointing_func
    assert "selective checkpointing: 1 decoder layers keep their activations" in caplog.text

    caplog.clear()  # the hf backend (here, on the CPU) leaves every layer checkpointed, and says so
    with caplog.at_level(logging.INFO, logger="ml"):
        cfg, paths, result = _trained(tmp_path, **{"train.max_steps": 2, "eval.eval_steps": 100,
                                                   "train.isolate": False, "train.uncheckpointed_layers": 1})
    assert "uncheckpointed_layers=1 is for the unsloth backend" in caplog.text
    assert "selective checkpointing:" not in caplog.text
    # the layout is in the trainer's first lines, its result, and the MLflow run's params
    assert "activation layout: train.uncheckpointed_layers=1: 1 (no GPU: not planned)" in caplog.text
    assert (result.uncheckpointed_layers, result.planned_peak_gib) == (1, None)
    from mlflow import MlflowClient

    client = MlflowClient(cfg.registry.tracking_uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              "tags.`pipeline.stage` = 'training'")
    assert [r.data.params["train.layout.uncheckpointed_layers"] for r in runs] == ["1"]
    assert runs[0].data.params["train.layout.reason"].startswith("train.uncheckpointed_layers=1")


class _FakeModel:
    """What plan_activations reads of a loaded model: its text config and its trainable parameters."""

    def __init__(self, layers: int = 32, hidden: int = 4096, intermediate: int = 14336, trainable: int = 41_943_040):
        text = SimpleNamespace(num_hidden_layers=layers, hidden_size=hidden, intermediate_size=intermediate,
                               num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                               tie_word_embeddings=False)
        self.config = SimpleNamespace(get_text_config=lambda: text)
        self.trainable = trainable

    def parameters(self) -> list[torch.Tensor]:
        return [torch.empty(self.trainable, dtype=torch.int8, device="meta").requires_grad_(False),
                torch.empty(self.trainable, device="meta", requires_grad=True)]


def _fake_cuda(monkeypatch: pytest.MonkeyPatch, free_gib: float, total_gib: float = 80.0,
               weights_gib: float = 5.5) -> None:
    """An H100 whose free memory and resident weights are as given (the planner's only view of it)."""
    gib = 2**30
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (int(free_gib * gib), int(total_gib * gib)))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda *a: int(weights_gib * gib))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda *a: int(weights_gib * gib))


def _plan_default(**kw: Any) -> speed.Layout:
    args: dict[str, Any] = {"model": _FakeModel(), "backend": "unsloth", "checkpointing": "unsloth", "batch_size": 12,
                            "max_seq_length": 512, "pad_to_multiple_of": 64, "optim": "adamw_8bit",
                            "loss_head": "trl", "fraction": None}
    args.update(kw)
    requested = args.pop("requested", "auto")
    return speed.plan_activations(requested, **args)


def test_auto_keeps_no_layer_on_the_cpu_and_a_fixed_number_is_used_as_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _plan_default().uncheckpointed_layers == 0
    assert _plan_default(requested=12).uncheckpointed_layers == 12
    _fake_cuda(monkeypatch, free_gib=70)
    assert _plan_default(backend="hf").uncheckpointed_layers == 0  # hf checkpoints every layer


def test_auto_plans_from_the_gpus_free_memory_and_honours_the_memory_fraction(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_cuda(monkeypatch, free_gib=74)  # an H100 with the 8B loaded
    whole = _plan_default()
    assert whole.uncheckpointed_layers == 32 and whole.usable_gib == pytest.approx(79.5)
    assert whole.planned_peak_gib is not None and whole.planned_peak_gib < 0.9 * 79.5
    capped = _plan_default(fraction=0.3)  # a 24 GB card simulated: 24 GiB
    assert capped.usable_gib == pytest.approx(24.0)
    assert 12 < capped.uncheckpointed_layers < 32, capped.reason
    assert "train.uncheckpointed_layers=auto: " in capped.reason
    # a fixed number is kept as set, with its estimate and what auto would keep
    fixed = _plan_default(requested=12, fraction=0.3)
    assert fixed.uncheckpointed_layers == 12 and f"auto would keep {capped.uncheckpointed_layers}" in fixed.reason


def test_a_plan_that_does_not_fit_fails_before_training_naming_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    from ml.errors import ConfigError

    _fake_cuda(monkeypatch, free_gib=74)
    with pytest.raises(ConfigError) as caught:  # 10 GiB: the weights and one checkpointed batch of 96 x 512 do not fit
        _plan_default(batch_size=96, fraction=0.125)
    message = str(caught.value)
    assert "does not fit this GPU" in message and "even with every layer recomputed" in message
    assert "train.per_device_train_batch_size" in message and "model.max_seq_length" in message
    assert "train.gpu_memory_fraction" in message
    with pytest.raises(ConfigError, match="train.gradient_checkpointing"):  # no recompute: every layer kept
        _plan_default(checkpointing="false", fraction=0.3)


def test_tokens_and_loss_positions_are_read_on_the_host(tiny_model: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_model)
    collate = DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id or 0)
    rows = [{"input_ids": list(range(5, 5 + n))} for n in (3, 7, 5)]
    counter = HostCollator(collate)
    batch = counter(rows)
    assert counter.tokens == 15 and batch["input_ids"].shape == (3, 7)  # 21 positions, 6 of them padding
    torch.testing.assert_close(batch["input_ids"], collate(rows)["input_ids"])  # the batch itself is untouched
    assert LABEL_POSITIONS not in batch
    counter(rows[:1])
    assert counter.tokens == 18

    labelled = [{"input_ids": [5, 6, 7, 8], "labels": [-100, -100, 7, 8]}, {"input_ids": [5, 6], "labels": [-100, 6]}]
    batch = HostCollator(collate, label_positions=True)(labelled)
    # row x 4 + column of each position whose next token is labelled (padding is labelled -100)
    assert batch[LABEL_POSITIONS].tolist() == [1, 2, 4]
    assert batch["labels"].reshape(-1)[batch[LABEL_POSITIONS] + 1].tolist() == [7, 8, 6]


def test_padding_batches_to_multiples_of_64_changes_no_loss(tiny_model: Path) -> None:
    """The seed profile pads to multiples of 64 (a few batch shapes, not one per batch):
    right padding is masked and unlabelled, so the loss and its gradients stay the same."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": torch.randint(5, model.config.vocab_size, (n,), generator=g).tolist()} for n in (9, 30, 17)]
    losses, grads = [], []
    for multiple in (None, 64):
        batch = DataCollatorForLanguageModeling(pad_token_id=0, pad_to_multiple_of=multiple)(rows)
        model.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        losses.append(loss.detach())
        grads.append(model.model.embed_tokens.weight.grad.clone())
        assert batch["input_ids"].shape == (3, 30 if multiple is None else 64)
    torch.testing.assert_close(losses[1], losses[0])
    torch.testing.assert_close(grads[1], grads[0])


def test_training_speed_leaves_out_evaluation_and_checkpoint_saving() -> None:
    counter = HostCollator(lambda rows: rows)
    meter = SpeedMeter(counter)
    state = SimpleNamespace(global_step=0)
    for step in range(1, 9):
        counter.tokens += 100  # one optimizer step's batches
        state.global_step = step
        meter.on_step_end(None, state, None)
        if step == 4:  # the evaluation collates its own batches and takes a while; then a checkpoint
            counter.tokens += 5000
            time.sleep(0.3)
            meter.on_evaluate(None, state, None)
            time.sleep(0.2)
            meter.on_save(None, state, None)
    tokens = [m[2] for m in meter.marks]
    assert tokens == [100 * s for s in range(1, 9)]
    assert meter.paused_s >= 0.5 and meter.paused_tokens == 5000
    assert max(b[1] - a[1] for a, b in zip(meter.marks, meter.marks[1:], strict=False)) < 0.3


def test_the_loss_head_is_trls_only_where_its_kernel_runs() -> None:
    assert resolve_loss_head("auto", cuda=True) == "trl"
    assert resolve_loss_head("auto", cuda=False) == "model"  # TRL's head is a Triton kernel
    assert resolve_loss_head("model", cuda=True) == "model"
    assert resolve_loss_head("trl", cuda=False) == "model"


def test_fused_head_metrics_kept_on_the_device_are_logged_as_numbers(tiny_model: Path, tmp_path: Path) -> None:
    cfg = load_config("e2e", {"model.base_model": str(tiny_model), "output_dir": str(tmp_path)})
    model, tokenizer, peft_config = load_for_training(cfg, "hf")
    rows = Dataset.from_list([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}])
    args = sft_config(cfg, "hf", tmp_path, cuda=False, evaluate=False)
    trainer = ProjectSFTTrainer(model=model, args=args, train_dataset=rows, processing_class=tokenizer,
                                peft_config=peft_config, loss_head="trl")
    trainer.model.train()
    trainer._metrics["train"]["mean_token_accuracy"] += [torch.tensor(0.25), torch.tensor(0.75)]
    trainer.log({"loss": 1.5})
    logged = trainer.state.log_history[-1]
    assert logged["mean_token_accuracy"] == 0.5 and isinstance(logged["mean_token_accuracy"], float)
    json.dumps(trainer.state.log_history)  # what log_history.json and MLflow receive


def test_the_cuda_loss_head_on_host_found_positions_equals_the_models_own_loss(
        tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On CUDA the training loss runs TRL's LM-head kernel on the labelled positions that the
    collator found on the host (no boolean-mask pick on the GPU, which waits for it). Here the
    kernel, a Triton program, is replaced by the same maths in torch; the rest is the real
    trainer, collator and model."""
    def kernel(hidden: Any, weight: Any, bias: Any, targets: Any, *_: Any) -> tuple[Any, ...]:
        logp = torch.log_softmax((hidden @ weight.T).float(), dim=-1)
        entropy = -(logp.exp() * logp).sum(-1)
        return logp.gather(-1, targets[:, None])[:, 0], entropy, None, None, logp.argmax(-1) == targets

    monkeypatch.setitem(sys.modules, "trl.kernels", types.SimpleNamespace(
        ChunkedLogProbFunction=types.SimpleNamespace(apply=kernel)))
    cfg = load_config("e2e", {"model.base_model": str(tiny_model), "output_dir": str(tmp_path)})
    model, tokenizer, peft_config = load_for_training(cfg, "hf")
    rows = [{"input_ids": list(range(5, 5 + n)), "labels": [-100] * (n - k) + list(range(5 + n - k, 5 + n))}
            for n, k in ((9, 4), (5, 2), (12, 7))]  # prompt tokens unlabelled, right padding to 12
    trainer = ProjectSFTTrainer(model=model, args=sft_config(cfg, "hf", tmp_path, cuda=False, evaluate=False),
                                train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                                peft_config=peft_config, loss_head="trl")
    trainer.model.train()
    batch = HostCollator(trainer.data_collator, label_positions=True)(rows)
    lora = next(p for n, p in trainer.model.named_parameters() if "lora_B" in n)

    def loss_and_grad(compute: Any, inputs: dict[str, Any], items: Any) -> tuple[float, Any]:
        lora.grad = None
        loss = compute(trainer.model, inputs, num_items_in_batch=items)
        loss.backward()
        return float(loss.detach()), lora.grad.clone()

    for items in (None, torch.tensor(20)):
        ours, ours_grad = loss_and_grad(trainer.compute_loss, dict(batch), items)
        plain = {k: v for k, v in batch.items() if k != LABEL_POSITIONS}
        own, own_grad = loss_and_grad(lambda *a, **k: Trainer.compute_loss(trainer, *a, **k), plain, items)
        assert ours == pytest.approx(own, rel=1e-5)
        torch.testing.assert_close(ours_grad, own_grad, rtol=1e-4, atol=1e-7)
    accuracy = trainer._metrics["train"]["mean_token_accuracy"]
    assert len(accuracy) == 2 and 0.0 <= float(accuracy[-1]) <= 1.0  # the fused path ran, twice


def _trainer_and_layer(tiny_model: Path, tmp_path: Path) -> tuple[Any, Any]:
    """A real SFTTrainer (the project's) and a decoder layer with checkpointing on, as training has them."""
    cfg = load_config("e2e", {"model.base_model": str(tiny_model), "output_dir": str(tmp_path)})
    model, tokenizer, peft_config = load_for_training(cfg, "hf")
    rows = Dataset.from_list([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}])
    trainer = ProjectSFTTrainer(model=model, args=sft_config(cfg, "hf", tmp_path, cuda=False, evaluate=False),
                                train_dataset=rows, processing_class=tokenizer, peft_config=peft_config)
    plain = AutoModelForCausalLM.from_pretrained(tiny_model)
    plain.gradient_checkpointing_enable()
    return trainer, plain.model.layers[0]


def test_every_internal_the_speed_machinery_uses_exists_in_the_installed_trl_and_transformers(
        tiny_model: Path, tmp_path: Path) -> None:
    missing = speed.missing_internals(*_trainer_and_layer(tiny_model, tmp_path))
    assert missing == [], "ml/speed.py relies on internals the installed versions lack:\n" + "\n".join(missing)


def test_an_internal_that_an_upgrade_renamed_is_named(
        tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    renamed = {("trl.trainer.utils", "_CHUNKED_LOGPROB_CHUNK_SIZE_V2"): "a renamed constant",
               ("trl.kernels", "ChunkedLogProbKernel"): "a renamed kernel (its module needs Triton on the CPU)",
               ("trl.kernels_v2", "ChunkedLogProbFunction"): "a moved module"}
    for key, why in renamed.items():
        monkeypatch.setitem(speed.INTERNALS, key, why)
    monkeypatch.setitem(speed.TRAINER_INTERNALS, "_metric_lists", "a renamed attribute")
    missing = speed.missing_internals(*_trainer_and_layer(tiny_model, tmp_path))
    assert [m.split(":")[0] for m in missing] == [
        "trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE_V2", "trl.kernels.ChunkedLogProbKernel",
        "trl.kernels_v2.ChunkedLogProbFunction", "ProjectSFTTrainer._metric_lists"]
    with pytest.raises(RuntimeError, match="trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE_V2 is gone"):
        speed.internal("trl.trainer.utils", "_CHUNKED_LOGPROB_CHUNK_SIZE_V2")



def test_padding_free_without_a_varlen_attention_kernel_warns_with_its_measured_cost(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    import importlib.util

    real = importlib.util.find_spec
    installed: set[str] = set()
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name in installed else (None if name in speed.VARLEN_PACKAGES
                                                                             else real(name, *a)))
    sdpa = SimpleNamespace(config=SimpleNamespace(_attn_implementation="sdpa"))
    with caplog.at_level(logging.WARNING, logger="ml"):
        assert speed.warn_padding_free(True, sdpa)
    assert caplog.text.count("train.padding_free=true without a variable-length attention kernel") == 1
    assert "3,689 against 10,520 tokens/s" in caplog.text and "attention sdpa" in caplog.text
    caplog.clear()
    flash = SimpleNamespace(config=SimpleNamespace(_attn_implementation="flash_attention_2"))
    assert not speed.warn_padding_free(True, flash)  # the model runs a FlashAttention variant
    assert not speed.warn_padding_free(False, sdpa) and not speed.warn_padding_free(None, sdpa)  # padded batches
    installed.add("flash_attn")
    assert not speed.warn_padding_free(True, sdpa) and speed.varlen_attention(sdpa) == "flash_attn"
    assert not caplog.text
