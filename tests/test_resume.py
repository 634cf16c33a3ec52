"""The CUDA worker's contract, on the CPU: training runs in a child process, checkpoints,
resumes after being killed, and a failed child fails the step with its output."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from ml import pipeline
from ml.config import load_config
from ml.errors import TrainingFailed
from ml.runs import run_paths
from ml.train import TrainResult

pytestmark = pytest.mark.slow


def test_a_killed_training_resumes_from_its_checkpoint_and_registers_once(
        tiny_model: Path, tracking: str, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    cfg = load_config("e2e", {"output_dir": str(tmp_path), "train.max_steps": 40, "train.save_steps": 10,
                              "registry.experiment": "resume", "registry.model_name": "resume-tiny-lora"})
    paths = run_paths(cfg, "killed-run")
    pipeline.load(cfg, paths)
    pipeline.prepare(cfg, paths)

    # First attempt: the same command the train task runs, killed once a checkpoint is complete.
    proc = subprocess.Popen(pipeline.training_command(cfg, paths), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not list((paths.train / "checkpoints").glob("checkpoint-*/trainer_state.json")):
        assert proc.poll() is None, "training ended before it could be killed"
        assert time.monotonic() < deadline, "no checkpoint within 4 minutes"
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not paths.trained.adapter.exists() and not paths.trained.result.exists()

    # The retry: what Airflow does with the failed task.
    result = pipeline.train(cfg, paths)
    assert result["resumed_from_step"] is not None and result["resumed_from_step"] % 10 == 0
    assert result["global_step"] == 40
    history = json.loads(Path(TrainResult.read(paths.train).log_history).read_text())
    steps = [row["step"] for row in history if "loss" in row]
    assert steps == list(range(1, 41))  # one curve, no gap and no repeat across the two attempts
    assert not (paths.train / "checkpoints").exists()  # cleaned once the adapter was saved

    pipeline.evaluate(cfg, paths)
    pipeline.register(cfg, paths, "killed-run")
    pipeline.promote(cfg, paths)
    versions = MlflowClient().search_model_versions("name='resume-tiny-lora'")
    assert len(versions) == 1


def test_a_failing_training_process_fails_the_step_with_its_output(
        tmp_path: Path, tiny_model: Path, tracking: str) -> None:
    from mlflow import MlflowClient

    cfg = load_config("e2e", {"output_dir": str(tmp_path), "model.base_model": str(tmp_path / "no-model"),
                              "registry.experiment": "broken-training"})
    paths = run_paths(cfg, "broken")
    pipeline.load(cfg, paths)
    pipeline.prepare(cfg, paths)
    with pytest.raises(TrainingFailed, match="exited with code 2") as err:  # 2: unusable input
        pipeline.train(cfg, paths)
    assert "cannot load tokenizer" in str(err.value) and "no-model" in str(err.value)
    # the attempt's MLflow run says so: FAILED, with the output's tail
    client = MlflowClient(tracking)
    (run,) = client.search_runs([client.get_experiment_by_name("broken-training").experiment_id])
    assert run.info.status == "FAILED" and run.data.tags["pipeline.stage"] == "training"
    tail = Path(client.download_artifacts(run.info.run_id, "train/log_tail.txt", str(tmp_path))).read_text()
    assert "cannot load tokenizer" in tail


def test_the_dag_sends_training_to_the_gpu_queue_with_a_retry(retrain_dag: Any) -> None:
    train, evaluate = retrain_dag.get_task("train"), retrain_dag.get_task("evaluate")
    assert train.queue == evaluate.queue == "gpu"
    assert train.retries == 1
    assert retrain_dag.get_task("load").queue != "gpu"


def test_a_trainer_past_its_time_limit_is_stopped_and_fails_naming_the_limit(
        tiny_model: Path, tracking: str, tmp_path: Path) -> None:
    """The limit is set below the time imports alone take: the child is stopped, none is left."""
    cfg = load_config("e2e", {"output_dir": str(tmp_path), "train.max_steps": 1000,
                              "train.timeout_per_step_s": 0.001, "train.timeout_startup_s": 3})
    assert cfg.train_time_limit_s(100) == pytest.approx(4.0)
    paths = run_paths(cfg, "slow-run")
    pipeline.load(cfg, paths)
    pipeline.prepare(cfg, paths)
    started = time.monotonic()
    with pytest.raises(TrainingFailed, match="did not finish within its time limit of 4 s"):
        pipeline.train(cfg, paths)
    assert time.monotonic() - started < 60
    config = str(paths.config)
    left = subprocess.run(["pgrep", "-f", config], capture_output=True, text=True)
    assert left.stdout == "", f"training processes left running: {left.stdout}"


def test_the_time_limit_counts_steps_or_epochs_and_is_capped() -> None:
    cfg = load_config("e2e", {"train.max_steps": -1, "train.num_train_epochs": 3,
                              "train.per_device_train_batch_size": 4, "train.gradient_accumulation_steps": 2})
    t = cfg.train
    assert t.optimizer_steps(100) == 3 * 13  # ceil(100 / 8) steps per epoch
    assert cfg.train_time_limit_s(100) == t.timeout_startup_s + 39 * t.timeout_per_step_s
    assert cfg.train_time_limit_s(10_000_000) == cfg.deploy.train_timeout_cap_h * 3600
