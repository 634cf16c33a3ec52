"""Real LoRA training of the tiny Llama on the Korean sample, and the loss that judges it."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from conftest import imports_of
from conftest import trained_run as _trained

from ml.config import load_config
from ml.data import read_split
from ml.evaluate import evaluate_model, sample_rows, token_loss
from ml.modeling import load_tokenizer, load_with_adapter, lora_config, use_adapter
from ml.prompt import PromptFormat, encode_all, render
from ml.runs import read_json, run_paths
from ml.train import TrainResult

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(evaluated_run: tuple[Any, Any]) -> tuple[Any, Any, TrainResult]:
    cfg, paths = evaluated_run
    return cfg, paths, TrainResult.read(paths.train)


def test_training_lowers_the_loss_and_saves_an_adapter(trained: Any) -> None:
    cfg, paths, result = trained
    history = json.loads(Path(result.log_history).read_text())
    losses = [r["loss"] for r in history if "loss" in r]
    evals = [r["eval_loss"] for r in history if "eval_loss" in r]
    assert result.global_step == cfg.train.max_steps == len(losses)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3
    assert evals[-1] < evals[0] and result.eval_loss == pytest.approx(evals[-1])
    adapter = Path(result.adapter_dir)
    assert (adapter / "adapter_config.json").exists() and (adapter / "adapter_model.safetensors").exists()
    assert (adapter / "tokenizer.json").exists()
    saved = json.loads((adapter / "adapter_config.json").read_text())
    assert saved["r"] == cfg.lora.r and set(saved["target_modules"]) == set(cfg.lora.target_modules)


def test_trained_adapter_beats_the_base_model_on_test(trained: Any) -> None:
    cfg, paths, _ = trained
    test = read_split(paths.splits, "test")
    args = (PromptFormat.from_config(cfg), 4)
    model, tok = load_with_adapter(cfg.model, paths.train / "adapter")
    challenger = evaluate_model(model, tok, test, *args)
    with model.disable_adapter():
        base = evaluate_model(model, tok, test, *args)
    assert challenger.loss < base.loss - 0.2
    assert challenger.tokens == base.tokens > 0 and challenger.examples == len(test)


def test_the_trainer_scores_the_test_split_as_a_fresh_load_of_its_adapter_does(trained: Any) -> None:
    """Scores written by the training process, with its model still loaded, are the evaluate step's own."""
    cfg, paths, _ = trained
    scores = read_json(paths.scores)
    assert scores["scored_in"] == "training process" and scores["champion_version"] is None
    assert scores["baseline_name"] == "base model" and len(scores["samples"]) == cfg.eval.num_sample_generations
    test = read_split(paths.splits, "test")
    model, tok = load_with_adapter(cfg.model, paths.train / "adapter")
    challenger = evaluate_model(model, tok, test, PromptFormat.from_config(cfg), 4)
    with model.disable_adapter():
        base = evaluate_model(model, tok, test, PromptFormat.from_config(cfg), 4)
    assert challenger.loss < base.loss - 0.2
    for record, fresh in ((scores["challenger"], challenger), (scores["baseline"], base)):
        assert record["loss"] == pytest.approx(fresh.loss, rel=1e-5) and record["tokens"] == fresh.tokens
        assert [r["key"] for r in record["rows"]] == [r.key for r in fresh.rows or []]
        assert [r["nll"] for r in record["rows"]] == pytest.approx([r.nll for r in fresh.rows or []], rel=1e-5)


def test_a_failed_scoring_in_the_trainer_keeps_the_training_and_leaves_no_scores(
        tiny_model: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from ml import pipeline
    from ml.backend import train_here
    from ml.runs import Champion, write_champion

    cfg = load_config("e2e", {"output_dir": str(tmp_path), "train.max_steps": 2})
    paths = run_paths(cfg, "t")
    pipeline.load(cfg, paths)
    pipeline.prepare(cfg, paths)
    gone = str(tmp_path / "no-such-adapter")
    write_champion(paths.champion, Champion("7", None, gone, gone, cfg.model.base_model, None, None, None, {}))
    result = train_here(cfg, paths.splits, paths.train, score_in=paths)
    assert result.global_step == 2 and (paths.train / "adapter" / "adapter_model.safetensors").exists()
    assert not paths.scores.exists()
    assert "scoring in the training process failed; the evaluate step will score" in caplog.text


def test_another_adapter_runs_in_place_of_the_first_or_beside_it(trained: Any, tmp_path: Path) -> None:
    """How a champion sharing the base is scored on the challenger's model: the same LoRA layout
    takes the first adapter's modules (no module added), another layout loads beside it."""
    cfg, paths, _ = trained
    test = read_split(paths.splits, "test")
    fmt = PromptFormat.from_config(cfg)
    model, tok = load_with_adapter(cfg.model, paths.train / "adapter")
    modules = len(list(model.modules()))
    for name, overrides in (("same", {"train.seed": 1}), ("r8", {"lora.r": 8})):
        _, other, _ = _trained(tmp_path / name, **{"train.max_steps": 3, "train.isolate": False, **overrides})
        expected = evaluate_model(*load_with_adapter(cfg.model, other.train / "adapter"), test, fmt, 4)
        before = evaluate_model(model, tok, test, fmt, 4)
        use_adapter(model, other.train / "adapter")
        got = evaluate_model(model, tok, test, fmt, 4)
        assert got.loss == pytest.approx(expected.loss, rel=1e-6) and got.loss != pytest.approx(before.loss)
        if name == "same":
            assert len(list(model.modules())) == modules and model.active_adapter == "default"
        else:
            assert model.active_adapter == "second"


def test_sample_answers_are_asked_only_where_the_answer_fits(trained: Any) -> None:
    cfg, paths, _ = trained
    test = read_split(paths.splits, "test")
    tok = load_tokenizer(cfg.model, str(paths.trained.adapter))
    fmt = PromptFormat.from_config(cfg)
    lengths = [len(tok(render(tok, fmt, ex.question, ex.contexts)[0], add_special_tokens=False)["input_ids"])
               for ex in test]
    limit = sorted(lengths)[len(lengths) // 2]  # about half the prompts fit with a 10-token answer
    tight = replace(fmt, max_length=limit + 10)
    rows = sample_rows(tok, test, tight, 3, max_new_tokens=10)
    assert rows == [ex for ex, n in zip(test, lengths, strict=True) if n <= limit][:3] and rows
    assert sample_rows(tok, test, tight, 3, max_new_tokens=11) == [
        ex for ex, n in zip(test, lengths, strict=True) if n < limit][:3]


def test_token_loss_matches_the_models_own_loss_and_ignores_padding(trained: Any) -> None:
    import torch

    cfg, paths, _ = trained
    model, tok = load_with_adapter(cfg.model, paths.train / "adapter")
    enc = encode_all(tok, read_split(paths.splits, "test")[:2], PromptFormat.from_config(cfg))
    singles = []
    for e in enc:
        with torch.no_grad():
            out = model(input_ids=torch.tensor([e.input_ids]), labels=torch.tensor([e.labels]))
        n = sum(t != -100 for t in e.labels[1:])
        singles.append((float(out.loss), n))
        assert token_loss(model, [e], tok.pad_token_id, 1).loss == pytest.approx(float(out.loss), rel=1e-5)
    batched = token_loss(model, enc, tok.pad_token_id, batch_size=2)  # padded together
    expected = sum(loss * n for loss, n in singles) / sum(n for _, n in singles)
    assert batched.loss == pytest.approx(expected, rel=1e-5)
    assert batched.tokens == sum(n for _, n in singles)


def test_a_negligible_learning_rate_leaves_the_model_unchanged(tiny_model: Path, tmp_path: Path) -> None:
    # 1e-9: the smallest honest "no training" (0 is refused by the config: it would register a no-op)
    cfg, paths, _ = _trained(tmp_path, **{"train.learning_rate": 1e-9, "train.max_steps": 3})
    test = read_split(paths.splits, "test")
    model, tok = load_with_adapter(cfg.model, paths.train / "adapter")
    args = (PromptFormat.from_config(cfg), 4)
    with_adapter = evaluate_model(model, tok, test, *args)
    with model.disable_adapter():
        base = evaluate_model(model, tok, test, *args)
    assert with_adapter.loss == pytest.approx(base.loss, abs=1e-6)


def test_a_training_whose_loss_turns_nan_fails_naming_the_step_and_registers_nothing(
        tiny_model: Path, tmp_path: Path) -> None:
    """A divergence the config's bounds do not rule out (here a learning rate past them, set as only code
    can): before, 1e9 trained to a NaN loss and registered a version."""
    from mlflow import MlflowClient

    from ml import pipeline
    from ml.errors import TrainingFailed

    cfg = load_config("e2e", {"output_dir": str(tmp_path), "registry.tracking_uri": f"sqlite:///{tmp_path / 'ml.db'}",
                              "train.max_steps": 4, "train.warmup_steps": 0, "train.isolate": False})
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"learning_rate": 1e9})})  # past le=1
    paths = run_paths(cfg, "diverged")
    pipeline.load(cfg, paths)
    pipeline.prepare(cfg, paths)
    diverged = r"diverged: loss is nan at step \d of 4 \(learning rate \S+; train.learning_rate 1e\+09\)"
    with pytest.raises(TrainingFailed, match=diverged):
        pipeline.train(cfg, paths)
    assert not (paths.train / "adapter").exists() and not paths.trained.result.exists()
    client = MlflowClient(cfg.registry.tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name(cfg.registry.experiment).experiment_id])
    assert run.info.status == "FAILED" and client.search_registered_models() == []


def test_top_k_layers_scope() -> None:
    cfg = load_config("e2e", {"lora.top_k_layers": 7, "lora.train_lm_head": True})
    lc = lora_config(cfg, num_layers=32)
    assert lc.layers_to_transform == list(range(25, 32))
    assert lc.modules_to_save == ["lm_head"]
    assert lora_config(load_config("pubmedqa-ko-llama31-8b"), 32).layers_to_transform is None


def test_training_without_validation_rows_skips_the_periodic_evaluation(tiny_model: Path, tmp_path: Path) -> None:
    _, paths, result = _trained(tmp_path, **{"data.val_fraction": 0.0, "train.max_steps": 2, "train.isolate": False})
    assert read_split(paths.splits, "validation") == []
    assert result.global_step == 2 and result.eval_loss is None


def test_the_trainer_imports_neither_airflow_nor_mlflow() -> None:
    statement = "import ml.__main__, ml.backend, ml.train"
    assert imports_of(statement, ("airflow", "mlflow", "great_expectations")) == []
