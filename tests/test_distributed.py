"""Data-parallel training (train.num_processes), on the CPU: torchrun's processes on gloo train the
update sequence one process trains, through the real train step (MLflow, supervision, retries)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from ml import distributed, pipeline, supervise
from ml.config import load_config
from ml.distributed import BatchSplit, rank_batches, root_cause, split_batch
from ml.errors import ConfigError, TrainingFailed
from ml.runs import RunPaths, run_paths
from ml.speed import HostCollator, StepSampler
from ml.train import TrainResult

STEPS, SAVE_STEPS = 10, 3


# --- the split of each optimizer step, and its batches -------------------------------------------

def test_the_accumulation_is_divided_first_then_the_micro_batch() -> None:
    assert split_batch(3, 4, 2) == BatchSplit(2, 3, 2)  # the seed's 3 x 4: each process keeps its micro-batch
    assert split_batch(3, 4, 4) == BatchSplit(4, 3, 1)
    assert split_batch(12, 1, 2) == BatchSplit(2, 6, 1)  # the default 12 x 1: the micro-batch is halved
    assert split_batch(6, 2, 4) == BatchSplit(4, 3, 1)  # both: accumulation / 2, micro-batch / 2
    assert split_batch(12, 1, 1) == BatchSplit(1, 12, 1)
    for per_device, accumulation, processes in ((3, 4, 2), (12, 1, 4), (6, 2, 4), (5, 3, 3)):
        split = split_batch(per_device, accumulation, processes)
        assert split.examples_per_step == per_device * accumulation  # the configured unit, whatever the count
    assert "12 examples per optimizer step" in split_batch(12, 1, 2).describe()


def test_a_process_count_that_does_not_divide_the_step_is_refused_naming_the_settings() -> None:
    with pytest.raises(ConfigError) as err:
        split_batch(12, 1, 8)
    for name in ("train.num_processes=8", "train.per_device_train_batch_size=12",
                 "train.gradient_accumulation_steps=1"):
        assert name in str(err.value)
    with pytest.raises(ConfigError, match="train.num_processes"):  # at config load, for a fixed count
        load_config("e2e", {"train.num_processes": 5})
    assert load_config("e2e", {"train.num_processes": "auto"}).train.num_processes == "auto"


def test_auto_is_one_process_per_gpu_and_a_count_beyond_the_gpus_is_refused() -> None:
    assert distributed.resolve_processes("auto", 0) == 1
    assert distributed.resolve_processes("auto", 4) == 4
    assert distributed.resolve_processes(2, 0) == 2  # the CPU: gloo
    with pytest.raises(ConfigError, match="train.num_processes=4 needs 4 GPUs"):
        distributed.resolve_processes(4, 2)


def _steps(batches: list[list[list[int]]], accumulation: int) -> list[set[int]]:
    """Per optimizer step, the examples of every process (each has the same number of micro-batches)."""
    assert len({len(b) for b in batches}) == 1
    steps, count = [], len(batches[0])
    for start in range(0, count, accumulation):
        steps.append({i for b in batches for batch in b[start:start + accumulation] for i in batch})
    return steps


@pytest.mark.parametrize(("per_device", "accumulation", "processes", "rows"),
                         [(12, 1, 2, 61), (3, 4, 2, 61), (3, 4, 4, 50), (1, 4, 4, 6), (6, 2, 4, 25), (2, 2, 2, 3)])
def test_every_optimizer_step_trains_the_examples_one_process_trains(
        per_device: int, accumulation: int, processes: int, rows: int) -> None:
    order = list(torch.randperm(rows, generator=torch.Generator().manual_seed(rows)).tolist())
    one = rank_batches(order, split_batch(per_device, accumulation, 1), 0)
    assert [i for b in one for i in b] == order and all(len(b) <= per_device for b in one)
    split = split_batch(per_device, accumulation, processes)
    several = [rank_batches(order, split, rank) for rank in range(processes)]
    assert all(len(b) <= split.per_device_batch for ranks in several for b in ranks)
    expected = [set(order[i:i + per_device * accumulation]) for i in range(0, rows, per_device * accumulation)]
    assert _steps(several, split.accumulation)[:len(expected)] == expected
    assert sum(len(b) for ranks in several for b in ranks) == rows  # each example once: an empty batch trains none


def test_the_order_is_the_same_whatever_the_process_count_and_changes_with_the_epoch() -> None:
    lengths = [int(x) for x in torch.randint(10, 500, (200,), generator=torch.Generator().manual_seed(0))]
    epoch = [0]

    def order(processes: int, grouped: bool) -> list[int]:
        split = split_batch(12, 1, processes)
        parts = [list(StepSampler(lengths, split, rank, 3407, grouped, lambda: epoch[0])) for rank in range(processes)]
        return [i for step in zip(*parts, strict=True) for batch in step for i in batch]

    for grouped in (True, False):
        first = order(1, grouped)
        assert order(2, grouped) == order(4, grouped) == first  # step by step, rank by rank
        epoch[0] = 1
        assert order(2, grouped) != first and sorted(order(2, grouped)) == sorted(first)
        epoch[0] = 0
    # group_by_length: examples of similar length share a step (their mega-batch is counted in steps)

    def spread(order: list[int]) -> float:
        steps = [[lengths[i] for i in order[s:s + 12]] for s in range(0, 192, 12)]
        return sum(max(step) - min(step) for step in steps) / len(steps)

    assert spread(order(2, True)) < spread(order(2, False)) / 2


def test_an_empty_micro_batch_is_a_row_without_a_labelled_token() -> None:
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    collate = HostCollator(DataCollatorForLanguageModeling(pad_token_id=0), blank_token=0)
    batch = collate([])
    assert batch["input_ids"].shape == (1, 1) and (batch["labels"] == -100).all()
    assert collate.tokens == 0  # not counted as training tokens


# --- torchrun's failure summary, and a stop that reaches every process ----------------------------

SUMMARY = """\
torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
============================================================
ml FAILED
------------------------------------------------------------
Failures:
[1]:
  time      : 2026-12-07_03:46:16
  host      : localhost
  rank      : 0 (local_rank: 0)
  exitcode  : -15 (pid: 10721)  (SIGTERM)
  error_file: <N/A>
  traceback : Signal 15 (SIGTERM) received by PID 10721
------------------------------------------------------------
Root Cause (first observed failure):
[0]:
  time      : 2026-12-07_03:46:15
  host      : localhost
  rank      : 1 (local_rank: 1)
  exitcode  : 1 (pid: 10722)
  error_file: /tmp/logs/attempt_0/1/error.json
  traceback : Traceback (most recent call last):
    File "ml/train.py", line 9, in finetune
      raise ValueError("boom on rank 1")
  ValueError: boom on rank 1

============================================================"""


def test_the_root_cause_names_the_failed_rank_and_its_error() -> None:
    failure = root_cause(["[rank0] step 1/10", *SUMMARY.splitlines()])
    assert failure == distributed.Failure(1, 1, "ValueError: boom on rank 1")
    assert failure.describe(2) == "training process rank 1 of 2 exited with code 1: ValueError: boom on rank 1"
    assert root_cause(["a line", "another"]) is None


def test_a_stop_reaches_what_the_program_started_in_a_session_of_its_own(tmp_path: Path) -> None:
    """torchrun starts each worker in a session of its own: out of its process group."""
    pid_file = tmp_path / "worker.pid"
    program = ("import subprocess, sys, time\n"
               "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'], start_new_session=True)\n"
               f"open({str(pid_file)!r}, 'w').write(str(p.pid))\n"
               "time.sleep(300)\n")
    done = supervise.run([sys.executable, "-c", program], limit_s=3, grace_s=5)
    assert done.expired
    assert _ends_within(int(pid_file.read_text()), 5)


def _ends_within(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while _alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] == "Z")  # a zombie has ended


def test_the_train_step_starts_torchrun_for_several_processes(tmp_path: Path) -> None:
    cfg = load_config("e2e", {"output_dir": str(tmp_path)})
    paths = run_paths(cfg, "cmd")
    paths.root.mkdir(parents=True)
    assert pipeline.training_command(cfg, paths)[1:4] == ["-m", "ml", "train"]
    two = load_config("e2e", {"output_dir": str(tmp_path), "train.num_processes": 2})
    cmd = pipeline.training_command(two, paths)
    assert cmd[1:3] == ["-m", "torch.distributed.run"] and cmd[cmd.index("--nproc-per-node") + 1] == "2"
    assert cmd[cmd.index("--max-restarts") + 1] == "0" and cmd[-6:-4] == ["ml", "train"]
    with pytest.raises(ConfigError, match="train.isolate"):
        pipeline.train(load_config("e2e", {"output_dir": str(tmp_path), "train.num_processes": 2,
                                           "train.isolate": False}), paths)


# --- real trainings: one process against two ------------------------------------------------------

def _config(tmp: Path, processes: int, **overrides: Any) -> Any:
    return load_config("e2e", {"output_dir": str(tmp), "train.max_steps": STEPS, "train.save_steps": SAVE_STEPS,
                               "train.num_processes": processes, "eval.score_while_loaded": False,
                               "registry.experiment": "data-parallel", **overrides})


def _prepared(cfg: Any, key: str) -> RunPaths:
    paths = run_paths(cfg, key)
    pipeline.load(cfg, paths)
    pipeline.prepare(cfg, paths)
    return paths


def _losses(history: list[dict[str, Any]]) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in history if "loss" in r}


@pytest.fixture(scope="module")
def one_process(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The reference: one process, in this one, its first checkpoint kept aside."""
    from transformers import TrainerCallback

    from ml.backend import train_here

    tmp = tmp_path_factory.mktemp("one")
    cfg = _config(tmp, 1)
    paths = _prepared(cfg, "one")
    kept = tmp / "first-checkpoint"

    class KeepFirstCheckpoint(TrainerCallback):  # type: ignore[misc]
        def on_save(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if not kept.exists():
                shutil.copytree(Path(args.output_dir) / f"checkpoint-{state.global_step}", kept)

    result = train_here(cfg, paths.splits, paths.train, callbacks=[KeepFirstCheckpoint()])
    history = json.loads(Path(result.log_history).read_text())
    return {"losses": _losses(history), "result": result, "checkpoint": kept}


def _assert_same_curve(history: list[dict[str, Any]], reference: dict[str, float]) -> None:
    losses = _losses(history)
    assert sorted(losses) == list(range(1, STEPS + 1)) == sorted(reference)
    for step, loss in reference.items():
        assert losses[step] == pytest.approx(loss, abs=1e-4), f"step {step}"


@pytest.mark.slow
def test_two_processes_train_the_curve_of_one_with_one_adapter_and_one_mlflow_run(
        one_process: dict[str, Any], tracking: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    from mlflow import MlflowClient

    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # two processes on two cores
    cfg = _config(tmp_path, 2, **{"eval.score_while_loaded": True, "eval.sanity_prompts": 0,  # `then`: rank 0's
                                  "eval.num_sample_generations": 0})
    paths = _prepared(cfg, "two")
    with caplog.at_level("INFO", logger="ml"):
        trained = pipeline.train(cfg, paths)

    result = TrainResult.read(paths.train)
    split = (result.num_processes, result.per_device_batch, result.accumulation, result.examples_per_step)
    assert split == (2, 6, 1, 12)
    # 61 training rows: each epoch ends with one example, so rank 1's last micro-batch there is empty
    history = json.loads(paths.trained.history.read_text())
    _assert_same_curve(history, one_process["losses"])
    assert (paths.trained.adapter / "adapter_model.safetensors").exists() and paths.scores.exists()
    assert trained["global_step"] == STEPS and not (paths.train / "checkpoints").exists()

    client = MlflowClient(tracking)
    experiment = client.get_experiment_by_name("data-parallel").experiment_id
    (run,) = client.search_runs([experiment], "tags.`pipeline.run_key` = 'two'")
    curve = client.get_metric_history(run.info.run_id, "train_loss")
    assert sorted(m.step for m in curve) == list(range(1, STEPS + 1))  # rank 0's records, each once
    params = {k: run.data.params[k] for k in ("train.num_processes", "train.layout.processes", "train.layout.backend",
                                              "train.layout.per_device_batch", "train.layout.examples_per_step")}
    assert list(params.values()) == ["2", "2", "hf", "6", "12"]
    # tokens/s is the job's: both processes' tokens over rank 0's training time, not rank 0's alone
    rank0 = [float(m.split("rank0_tokens/s=")[1].split()[0]) for m in caplog.messages if "rank0_tokens/s=" in m]
    assert 1.5 < result.tokens_per_s / rank0[-1] < 2.5
    assert any(m.startswith("[train] [rank0] ") for m in caplog.messages)  # each worker's lines say whose


def _rank_pid(run_key: str, rank: int) -> int | None:
    """The worker of that rank training that run, from /proc (its command line and environment)."""
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            env = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"train" in cmdline and run_key.encode() in cmdline and f"RANK={rank}".encode() in env:
            return int(proc.name)
    return None


def _training_processes(run_key: str) -> list[int]:
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if run_key.encode() in (proc / "cmdline").read_bytes().split(b"\0") and _alive(int(proc.name)):
                found.append(int(proc.name))
        except OSError:
            continue
    return found


@pytest.mark.slow
def test_a_killed_process_ends_the_training_naming_its_rank_and_the_retry_resumes_in_one(
        one_process: dict[str, Any], tracking: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """kill -9 of rank 1 once a checkpoint is written: torchrun stops rank 0, the step fails naming rank 1,
    nothing is left running; the retry, in one process, resumes from the two processes' checkpoint."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    cfg = _config(tmp_path, 2)
    paths = _prepared(cfg, "killed")
    killed: list[int] = []

    def kill_rank_1() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if list((paths.train / "checkpoints").glob("checkpoint-*/trainer_state.json")):
                pid = _rank_pid("killed", 1)
                if pid is not None:
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                    return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_rank_1, daemon=True)
    killer.start()
    started = time.monotonic()
    with pytest.raises(TrainingFailed) as err:
        pipeline.train(cfg, paths)
    killer.join()
    assert killed, "no checkpoint before the training ended"
    assert "training process rank 1 of 2 was killed by signal 9" in str(err.value)
    assert time.monotonic() - started < 120  # ended at once, not at a time limit
    assert all(_ends_within(pid, 5) for pid in _training_processes("killed"))  # torchrun and rank 0 are gone too
    assert not paths.trained.result.exists()

    # The retry, in one process (in this one: quicker to start): it resumes from the two processes' checkpoint.
    retried = pipeline.train(_config(tmp_path, 1, **{"train.isolate": False}), paths)
    assert retried["resumed_from_step"] in (3, 6, 9) and retried["global_step"] == STEPS
    _assert_same_curve(json.loads(paths.trained.history.read_text()), one_process["losses"])


@pytest.mark.slow
def test_a_checkpoint_of_one_process_resumes_in_two(
        one_process: dict[str, Any], tracking: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    cfg = _config(tmp_path, 2)
    paths = _prepared(cfg, "resumed-in-two")
    shutil.copytree(one_process["checkpoint"], paths.train / "checkpoints" / f"checkpoint-{SAVE_STEPS}")
    trained = pipeline.train(cfg, paths)
    assert trained["resumed_from_step"] == SAVE_STEPS and trained["num_processes"] == 2
    _assert_same_curve(json.loads(paths.trained.history.read_text()), one_process["losses"])


def test_the_trainer_entry_records_its_error_for_torchrun(tmp_path: Path) -> None:
    """`ml train`'s errors reach torchrun's summary: its entry writes them to torchrun's error file."""
    error_file = tmp_path / "error.json"
    env = {**os.environ, "TORCHELASTIC_ERROR_FILE": str(error_file)}
    out = subprocess.run([sys.executable, "-m", "ml", "train", "--config", str(tmp_path / "none.json")],
                         cwd=Path(__file__).parent.parent, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "cannot use config file" in out.stderr  # still the CLI's exit code and line
    assert "ConfigError: cannot use config file" in json.loads(error_file.read_text())["message"]["message"]
