"""GPU proof (pytest -m gpu; skipped without CUDA): both backends train the Llama-3.1-8B
architecture in 4-bit, the loss falls on a repeated batch, the trainer scores the test split with
its model still loaded, and the adapter reloads, scores the test split as the trainer did and generates.

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
    assert result["peak_gpu_gib"] < 16

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
