"""GPU proof (pytest -m gpu; skipped without CUDA): both backends train the Llama-3.1-8B
architecture in 4-bit, the loss falls on a repeated batch, the trainer scores the test split with
its model still loaded, and the adapter reloads, scores the test split as the trainer did and generates.
The `auto` activation layout fits, trains the loss curve of full recompute, and trains the default
profile's shape within a 24 GB cap; a batch that cannot fit fails before training.

Needs the random-weight 8B model that ../shared/gpu/anchor_bench.py `make` writes to
/tmp/l8b (or $GPU_TEST_MODEL). Each training runs as the DAG's child process does
(`python -m ml train`), so Unsloth's patches stay in their own process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
MODEL = Path(os.environ.get("GPU_TEST_MODEL", "/tmp/l8b"))
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(not (MODEL / "config.json").exists(), reason=f"no 8B model at {MODEL} (anchor_bench.py make)"),
]

RELOAD = """
import json, sys
from pathlib import Path
from ml.config import PipelineConfig
from ml.data import read_split
from ml.evaluate import evaluate_model, generate_answers
from ml.modeling import load_with_adapter
from ml.prompt import PromptFormat
cfg = PipelineConfig.model_validate_json(Path(sys.argv[1]).read_text())
run = Path(sys.argv[2])
model, tok = load_with_adapter(cfg.model, run / "train" / "adapter")
test = read_split(run / "splits", "test")
fmt = PromptFormat.from_config(cfg)
loss = evaluate_model(model, tok, test, fmt, 2)
with model.disable_adapter():
    base = evaluate_model(model, tok, test, fmt, 2)
answers = generate_answers(model, tok, test[:3], fmt, 8)  # one left-padded batch of prompts of three lengths
alone = [generate_answers(model, tok, [ex], fmt, 8)[0] for ex in test[:3]]
print("RELOAD " + json.dumps({"loss": loss.loss, "base": base.loss, "tokens": loss.tokens, "answers": answers,
                             "alone": alone, "references": [ex.answer for ex in test[:3]],
                             "4bit": bool(getattr(model, "is_loaded_in_4bit", False))}))
"""


@pytest.mark.parametrize("backend", ["unsloth", "hf"])
def test_backend_trains_the_8b_architecture_in_4bit(backend: str, tmp_path: Path) -> None:
    from ml import pipeline
    from ml.config import load_config
    from ml.data import QAExample, write_jsonl
    from ml.runs import run_paths

    words = lambda n, s: " ".join(f"t{(s * 7919 + i * 104729) % 128000}" for i in range(n))  # noqa: E731
    batch = [QAExample(f"k{i}", words(20, i), (words(200, i + 50),), words(60, i + 99)) for i in range(6)]
    for split in ("train", "validation", "test"):  # a repeated batch: the adapter must learn it
        write_jsonl(batch, tmp_path / "run" / "splits" / f"{split}.jsonl")
    cfg = load_config("pubmedqa-ko-llama31-8b", {
        "model.base_model": str(MODEL), "train.backend": backend, "train.max_steps": 16,
        "train.learning_rate": 2e-3, "train.warmup_steps": 1, "train.gradient_accumulation_steps": 1,
        "train.save_steps": 6, "eval.eval_steps": 6, "output_dir": str(tmp_path),
        "registry.tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"})
    paths = run_paths(cfg, "run")

    result = pipeline.train(cfg, paths)  # a child process, as on the CUDA worker
    assert result["backend"] == backend and result["global_step"] == 16
    history = json.loads(Path(result["log_history"]).read_text())
    losses = [r["loss"] for r in history if "loss" in r]
    print(backend, "losses", [round(x, 3) for x in losses], "peak GiB", result["peak_gpu_gib"])
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.99 * first, losses
    # TRL's fused head (train.loss_head auto on CUDA) logs token accuracy, read from the device at logging steps
    accuracy = [r["mean_token_accuracy"] for r in history if "mean_token_accuracy" in r and "loss" in r]
    assert len(accuracy) == 16 and all(0.0 <= a <= 1.0 for a in accuracy), accuracy
    assert accuracy[-1] > accuracy[0], accuracy
    if backend == "hf":  # every layer recomputed
        assert result["peak_gpu_gib"] < 16
    else:  # `auto` spends the card on activations: within its plan, the plan within the card
        total = torch.cuda.get_device_properties(0).total_memory / 2**30
        assert result["peak_gpu_gib"] <= 1.15 * result["planned_peak_gib"]  # planned for 12 x 512; 6 rows here
        assert result["peak_gpu_gib"] <= 0.9 * total

    out = subprocess.run([sys.executable, "-c", RELOAD, str(paths.config), str(paths.root)],
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    reloaded = json.loads(out.stdout.split("RELOAD ", 1)[1])
    assert reloaded["4bit"] and reloaded["tokens"] > 0
    print(backend, "reloaded", reloaded)
    # the learnt answers, batched as alone: each starts with its reference's first word
    assert reloaded["answers"] == reloaded["alone"]
    assert all(a.split()[:1] == r.split()[:1] for a, r in zip(reloaded["answers"], reloaded["references"], strict=True))
    assert reloaded["loss"] < 0.99 * reloaded["base"]  # the saved adapter carries what was learnt

    # the trainer scored the test split with its model still loaded, as a fresh load of the adapter does
    scores = json.loads(paths.scores.read_text())
    print(backend, "scored in the training process", {k: scores[k]["loss"] for k in ("challenger", "baseline")},
          f"{scores['seconds']} s")
    assert scores["scored_in"] == "training process" and scores["baseline_name"] == "base model"
    assert scores["challenger"]["loss"] < 0.99 * scores["baseline"]["loss"]
    assert scores["baseline"]["loss"] == pytest.approx(reloaded["base"], rel=0.02)
    assert scores["challenger"]["tokens"] == reloaded["tokens"]


def _long_rows(tmp_path: Path) -> None:
    """12 rows past 512 tokens, the same in every split: the default's longest micro-batch, 12 x 512."""
    from ml.data import QAExample, write_jsonl

    words = lambda n, s: " ".join(f"t{(s * 7919 + i * 104729) % 128000}" for i in range(n))  # noqa: E731
    rows = [QAExample(f"k{i}", words(25, i), (words(520, i + 50),), words(110, i + 99)) for i in range(12)]
    for split in ("train", "validation", "test"):
        write_jsonl(rows, tmp_path / "run" / "splits" / f"{split}.jsonl")


def _train_default(tmp_path: Path, name: str, **overrides: object) -> dict[str, object]:
    from ml import pipeline
    from ml.config import load_config
    from ml.runs import run_paths

    folder = tmp_path / name
    _long_rows(folder)
    cfg = load_config("pubmedqa-ko-llama31-8b", {
        "model.base_model": str(MODEL), "train.backend": "unsloth", "train.save_steps": 100,
        "eval.eval_steps": 100, "eval.score_while_loaded": False, "output_dir": str(folder),
        "registry.tracking_uri": f"sqlite:///{folder / 'mlflow.db'}", **overrides})
    return pipeline.train(cfg, run_paths(cfg, "run"))  # a child process, as on the CUDA worker


def _losses(result: dict[str, object]) -> list[float]:
    return [r["loss"] for r in json.loads(Path(str(result["log_history"])).read_text()) if "loss" in r]


def test_auto_layout_fits_and_trains_the_loss_curve_of_full_recompute(tmp_path: Path) -> None:
    auto = _train_default(tmp_path, "auto", **{"train.max_steps": 6})
    full = _train_default(tmp_path, "full", **{"train.max_steps": 6, "train.uncheckpointed_layers": 0})
    print("auto", auto["uncheckpointed_layers"], "layers kept, planned", auto["planned_peak_gib"], "GiB, peak",
          auto["peak_gpu_gib"], "GiB; full recompute peak", full["peak_gpu_gib"], "GiB")
    print("losses auto", _losses(auto), "full", _losses(full))
    total = torch.cuda.get_device_properties(0).total_memory / 2**30
    assert full["uncheckpointed_layers"] == 0 and 0 < auto["uncheckpointed_layers"] <= 32  # type: ignore[operator]
    if total > 70:  # an 80 GB or larger card holds every layer's activations at 12 x 512 (26 GiB)
        assert auto["uncheckpointed_layers"] == 32
    assert auto["peak_gpu_gib"] <= 0.9 * total  # type: ignore[operator]
    assert auto["peak_gpu_gib"] == pytest.approx(auto["planned_peak_gib"], rel=0.15)
    # the same examples in the same order, the same updates: only which layers recompute differs
    assert _losses(auto) == pytest.approx(_losses(full), rel=0.02, abs=0.02)


def test_the_default_profile_trains_within_a_24_gb_cap(tmp_path: Path) -> None:
    fraction = 24e9 / torch.cuda.get_device_properties(0).total_memory  # a 24 GB card's memory
    result = _train_default(tmp_path, "cap24", **{"train.max_steps": 4, "train.gpu_memory_fraction": fraction})
    print("24 GB cap:", result["uncheckpointed_layers"], "layers kept, planned", result["planned_peak_gib"],
          "GiB, peak", result["peak_gpu_gib"], "GiB,", result["tokens_per_s"], "tokens/s")
    assert result["global_step"] == 4 and result["peak_gpu_gib"] <= 24e9 / 2**30  # type: ignore[operator]
    assert 12 < result["uncheckpointed_layers"] < 32  # type: ignore[operator]  # more than the old fixed 12


def test_a_batch_that_cannot_fit_fails_before_training_naming_the_settings(tmp_path: Path) -> None:
    from ml.errors import TrainingFailed

    fraction = 8e9 / torch.cuda.get_device_properties(0).total_memory
    with pytest.raises(TrainingFailed) as caught:  # 8 GB: the 8B's weights and a 96 x 512 batch do not fit
        _train_default(tmp_path, "nofit", **{"train.max_steps": 2, "train.per_device_train_batch_size": 96,
                                             "train.gpu_memory_fraction": fraction})
    message = str(caught.value)
    assert "does not fit this GPU" in message and "train.per_device_train_batch_size" in message
    assert "step 1/" not in message  # failed before the first step
