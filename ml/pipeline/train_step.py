"""The train step: the champion fetched, then the trainer (`python -m ml train`) in a process of its
own under supervision (ml/supervise.py), or several started by torchrun (`train.num_processes`,
ml/distributed.py), inside the one MLflow run of this training attempt."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from ml import distributed, supervise
from ml.config import PipelineConfig
from ml.errors import ConfigError, TrainingFailed
from ml.runs import RunPaths, read_json, write_json

if TYPE_CHECKING:
    from ml.runs import Champion

log = logging.getLogger(__name__)


def fetch_champion(cfg: PipelineConfig, paths: RunPaths) -> Champion | None:
    """The champion this run competes with (None: the base model), in the run folder (ml/champion.py)."""
    from ml import champion, tracking  # MLflow

    return champion.fetch(tracking.connect(cfg.registry), cfg.registry, paths.champion)


def train(cfg: PipelineConfig, paths: RunPaths, run_key: str | None = None,
          opened: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Train in a child process (`train.isolate`, the default) or in this one. The champion is
    fetched first, so that the trainer can score the challenger against it while its model is
    still loaded (`eval.score_while_loaded`). The attempt is an MLflow run while it trains
    (`tracking.TrainingRun`: its metrics live, system metrics, FAILED with the log's tail if it
    fails; `opened` is told its id before training starts); register continues it."""
    from ml import champion, tracking  # MLflow

    finished = finished_training(paths)
    if finished is not None:  # a retry after the training ended (MLflow away as it closed the run, say)
        log.info("the training of an earlier attempt finished (%s steps, adapter %s): not training again; "
                 "register records it", finished["global_step"], paths.trained.adapter)
        return {**finished, "reused": True}
    paths.scores.unlink(missing_ok=True)  # an earlier attempt's scores are not this adapter's
    processes = training_split(cfg).processes  # a process count that cannot work fails before anything starts
    if processes > 1 and not cfg.train.isolate:
        raise ConfigError(f"train.num_processes={cfg.train.num_processes} ({processes} processes) needs "
                          "train.isolate: true: torchrun starts the training processes")
    client = tracking.connect(cfg.registry)
    if cfg.eval.score_while_loaded:
        champion.fetch(client, cfg.registry, paths.champion)
    with tracking.TrainingRun(client, cfg, run_key or paths.key, paths.train) as run:
        if opened:
            opened(run.run_id)
        if not cfg.train.isolate:
            from ml.backend import train_here  # torch, and Unsloth before transformers

            return asdict(train_here(cfg, paths.splits, paths.train, score_in=paths))
        return _train_in_child(cfg, paths)


def finished_training(paths: RunPaths) -> dict[str, Any] | None:
    """The result of a training that finished in this run folder (its adapter and summary written,
    the test split scored where it scores while loaded), or None. The run folder holds one config
    and one snapshot (`freeze`, `load`), so a finished adapter there is this run's."""
    try:
        result = read_json(paths.trained.result)
    except (OSError, ValueError):  # not written yet, or cut short by a kill
        return None
    return result if isinstance(result, dict) and paths.trained.adapter.is_dir() else None


def training_split(cfg: PipelineConfig) -> distributed.BatchSplit:
    """How many processes train (`train.num_processes` on this worker's GPUs) and how they share the
    configured examples per optimizer step; refused (ConfigError) where they cannot."""
    t = cfg.train
    gpus = distributed.visible_gpus() if t.num_processes != 1 else 0  # one process: no torch import here
    processes = distributed.resolve_processes(t.num_processes, gpus)
    return distributed.split_batch(t.per_device_train_batch_size, t.gradient_accumulation_steps, processes)


def training_command(cfg: PipelineConfig, paths: RunPaths) -> list[str]:
    """The child's command line: the trainer, or torchrun starting `train.num_processes` of them (each
    one's whole output also in train/process_logs/); the run's resolved config travels as a file in the
    run folder."""
    write_json(paths.config, cfg.model_dump(mode="json"))
    launcher = distributed.launch_command(training_split(cfg).processes, str(paths.train / "process_logs"))
    return [sys.executable, *launcher, "-m", "ml", "train", "--config", str(paths.config), "--run-key", paths.key]


def _train_in_child(cfg: PipelineConfig, paths: RunPaths) -> dict[str, Any]:
    """`python -m ml train` with this run's resolved config (torchrun's processes of it); its log lines
    stream into ours. A child still running at its time limit is stopped; the task's retry resumes from
    the last checkpoint. A failed process of several ends them all (torchrun), and the step's error
    names it with its own error."""
    split = training_split(cfg)
    cmd = training_command(cfg, paths)
    with paths.split("train").open(encoding="utf-8") as f:
        rows = sum(1 for _ in f)
    limit, steps = cfg.train_time_limit_s(rows), cfg.train.optimizer_steps(rows)
    log.info("starting training (time limit %.0f s for %d steps; %s): %s", limit, steps, split.describe(),
             " ".join(cmd))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "ML_LOG_FORMAT": "%(name)s: %(message)s", **distributed.launch_env()}
    summary: list[str] = []  # torchrun's failure summary, from its root cause on: longer than the tail may be

    def relay(line: str) -> None:
        log.info("[train] %s", line)
        if summary or "Root Cause (first observed failure)" in line:
            summary.append(line)

    done = supervise.run(cmd, limit_s=limit, env=env, on_line=relay)
    text = "\n".join(done.tail)
    if done.expired:
        raise TrainingFailed(f"training did not finish within its time limit of {limit:.0f} s "
                             f"(train.timeout_per_step_s x {steps} steps + train.timeout_startup_s, at most "
                             "deploy.train_timeout_cap_h) and was stopped; a retry resumes from the last "
                             "checkpoint. Last output:\n" + text)
    if done.returncode != 0:
        hint = ("; CUDA ran out of memory: lower train.per_device_train_batch_size (raising "
                "gradient_accumulation_steps keeps the optimisation the same) or model.max_seq_length"
                if "out of memory" in text.lower() else "")
        failed = distributed.root_cause(summary)
        if failed is not None:  # one of several: torchrun stopped the others
            raise TrainingFailed(f"{failed.describe(split.processes)}{hint}; torchrun stopped the other processes, "
                                 f"and a retry resumes from the last checkpoint. Last output:\n{text}")
        rc = done.returncode
        how = f"was killed by signal {-rc}" if rc < 0 else f"exited with code {rc}"
        raise TrainingFailed(f"training process {how}{hint}. Last output:\n{text}")
    log.info("the training process ended after %.1fs", done.seconds)
    return {**read_json(paths.trained.result), "process_s": round(done.seconds, 1)}
