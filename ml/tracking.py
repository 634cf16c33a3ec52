"""MLflow runs, beside the registry's versions and aliases (ml/registry.py): the tracking server and
its experiment, the run of a training attempt while it trains, the runs of retrains that did not
train (skipped, stopped at the gate), and a run's data as dataset inputs.

Every run carries its pipeline run key (`RUN_KEY_TAG`), so that a retried task finds its own.
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import threading
import time
import warnings
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import mlflow
import mlflow.data
import pandas as pd
from mlflow import MlflowClient
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.huggingface_dataset_source import HuggingFaceDatasetSource
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException

from ml.config import PipelineConfig, RegistryConfig, project_root, resolve_path
from ml.data import read_split
from ml.errors import RegistryUnavailable
from ml.identity import adapter_hash
from ml.review_card import param_value
from ml.runs import TRAIN_METRICS

log = logging.getLogger(__name__)

# MLflow logs through a handler of its own on stderr, which an Airflow task shows as ERROR lines
# ("Successfully terminated system metrics monitoring!"): its records go to the root logger
# instead, at their own level, as the rest of the task's log does.
logging.getLogger("mlflow").handlers.clear()
logging.getLogger("mlflow").propagate = True

RUN_KEY_TAG = "pipeline.run_key"
STAGE_TAG = "pipeline.stage"  # training, validation (a failed gate), skipped
ADAPTER_TAG = "adapter_sha256"  # of the adapter a training run wrote, and a version holds


def connect(reg: RegistryConfig) -> MlflowClient:
    if reg.tracking_uri:
        mlflow.set_tracking_uri(reg.tracking_uri)
    # MLflow's own defaults wait 120 s per request and retry 7 times with backoff: minutes per call
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(int(math.ceil(reg.request_timeout_s)))
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = str(reg.request_retries)
    return MlflowClient()


def check_writable(reg: RegistryConfig) -> None:
    """Before any training: the tracking server answers and takes this user's writes (the run's
    experiment exists or is created, and gets a tag). Fails naming the tracking URI."""
    uri = mlflow.get_tracking_uri() if not reg.tracking_uri else reg.tracking_uri
    try:
        client = connect(reg)
        experiment_id = ensure_experiment(reg)
        client.set_experiment_tag(experiment_id, "pipeline.last_check", datetime.now(UTC).isoformat(timespec="seconds"))
    except (MlflowException, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RegistryUnavailable(
            f"MLflow at {uri} cannot be used by this run (nothing was trained): {first[:300]}. "
            "Check MLFLOW_TRACKING_URI, the server, and MLFLOW_TRACKING_USERNAME/PASSWORD") from exc


def ensure_experiment(reg: RegistryConfig) -> str:
    client = connect(reg)
    exp = client.get_experiment_by_name(reg.experiment)
    if exp is not None:
        return str(exp.experiment_id)
    location = None
    if reg.artifact_location and not mlflow.get_tracking_uri().startswith(("http://", "https://")):
        # Local stores need an explicit home for artifacts; a server proxies its own.
        location = resolve_path(reg.artifact_location).as_uri()
    try:
        return str(client.create_experiment(reg.experiment, artifact_location=location))
    except MlflowException as exc:  # two runs started together on a new server: the other created it
        if exc.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise
        exp = client.get_experiment_by_name(reg.experiment)
        if exp is None:
            raise
        return str(exp.experiment_id)


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=project_root(), capture_output=True,
                             text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def log_skipped(cfg: PipelineConfig, run_key: str, reason: str, snapshot: dict[str, Any]) -> str:
    """A finished run that says why this retrain did not train: nothing changed since the champion."""
    experiment_id = ensure_experiment(cfg.registry)
    tags = {RUN_KEY_TAG: run_key, STAGE_TAG: "skipped", "decision": "skipped", "decision_reason": reason,
            "data_fingerprint": snapshot["fingerprint"], "profile": cfg.profile, "mlflow.note.content": reason}
    with mlflow.start_run(experiment_id=experiment_id, run_name=f"{run_key} (skipped)", tags=tags) as run:
        mlflow.log_metric("dataset_rows", snapshot["rows"])
    return str(run.info.run_id)


def log_failed_validation(cfg: PipelineConfig, run_key: str, run_dir: Path, snapshot: dict[str, Any]) -> str:
    """A run that records why a retrain stopped at the gate: tags, the reports, status FAILED.

    No model, no version: the registry itself is untouched."""
    experiment_id = ensure_experiment(cfg.registry)
    tags = {RUN_KEY_TAG: run_key, STAGE_TAG: "validation", "validation": "failed",
            "data_fingerprint": snapshot["fingerprint"], "data_source": snapshot["source"], "profile": cfg.profile}
    with mlflow.start_run(experiment_id=experiment_id, run_name=f"{run_key} (gate failed)", tags=tags) as run:
        mlflow.log_metric("dataset_rows", snapshot["rows"])
        for report in sorted((run_dir / "reports").glob("validation.*")):
            mlflow.log_artifact(str(report), "reports")
        mlflow.end_run(status="FAILED")
    log.info("gate failure logged as MLflow run %s", run.info.run_id)
    return str(run.info.run_id)


# The trainer's logged records -> the run's metric names.
CURVE = (("loss", "train_loss"), ("eval_loss", "val_loss"), ("learning_rate", "learning_rate"),
         ("grad_norm", "grad_norm"))


def curve_metrics(records: list[dict[str, Any]]) -> list[Metric]:
    """Metrics of the trainer's records (its metrics file: step and wall-clock time each)."""
    return [Metric(dst, float(row[src]), int(row.get("time", time.time()) * 1000), int(row.get("step", 0)))
            for row in records for src, dst in CURVE if src in row]


def log_batches(client: MlflowClient, run_id: str, metrics: list[Metric]) -> None:
    for i in range(0, len(metrics), 900):  # log_batch takes at most 1000 metrics
        client.log_batch(run_id, metrics=metrics[i:i + 900])


class TrainingRun:
    """The MLflow run of one training attempt, open while the trainer runs in another process: the
    config as params at once, each record the trainer appends to its metrics file relayed with its own
    step and time, MLflow's system metrics (CPU, memory, GPU where present) sampled meanwhile. A
    training that fails leaves the run FAILED with the output's tail as `train/log_tail.txt`;
    register continues a finished one with everything else and the version."""

    def __init__(self, cfg: PipelineConfig, run_key: str, train_dir: Path, every_s: float = 2.0) -> None:
        self.cfg, self.run_key, self.train_dir, self.every_s = cfg, run_key, train_dir, every_s
        self.file = train_dir / TRAIN_METRICS
        self.offset, self.stop, self.thread = 0, threading.Event(), threading.Thread(target=self._poll, daemon=True)
        self.run_id = ""

    def __enter__(self) -> TrainingRun:
        experiment_id = ensure_experiment(self.cfg.registry)
        mlflow.set_system_metrics_sampling_interval(self.every_s)
        mlflow.set_system_metrics_samples_before_logging(1)
        run = mlflow.start_run(experiment_id=experiment_id, run_name=self.run_key, log_system_metrics=True,
                               tags={RUN_KEY_TAG: self.run_key, STAGE_TAG: "training", "profile": self.cfg.profile})
        self.run_id = run.info.run_id
        mlflow.log_params({k: param_value(v) for k, v in self.cfg.flat().items()})
        # an earlier attempt's records are not this run's (and the trainer starts the file anew)
        self.file.unlink(missing_ok=True)
        self.thread.start()
        return self

    def relay(self) -> None:
        """What the trainer appended since the last call, as metrics of the run."""
        if not self.file.exists():
            return
        if self.file.stat().st_size < self.offset:  # started anew under us: read it from its start
            self.offset = 0
        with self.file.open(encoding="utf-8") as f:
            f.seek(self.offset)
            lines = f.readlines()
        complete = [line for line in lines if line.endswith("\n")]  # a line being written waits
        self.offset += sum(len(line.encode("utf-8")) for line in complete)
        log_batches(MlflowClient(), self.run_id, curve_metrics([json.loads(line) for line in complete]))

    def _poll(self) -> None:
        while not self.stop.wait(self.every_s):
            try:
                self.relay()
            except (MlflowException, OSError, ValueError) as exc:  # the server away a moment: the next poll
                log.warning("relaying training metrics to MLflow: %s", exc)  # catches up

    def __exit__(self, kind: Any, error: Any, trace: Any) -> None:
        self.stop.set()
        self.thread.join()
        self.relay()
        if error is not None:
            mlflow.log_text(str(error), "train/log_tail.txt")
        else:  # which adapter it wrote: register continues only the run of the adapter it registers
            mlflow.set_tag(ADAPTER_TAG, adapter_hash(self.train_dir / "adapter"))
        mlflow.end_run("FAILED" if error is not None else "FINISHED")


def training_run(client: MlflowClient, experiment_id: str, run_key: str, adapter: str) -> str | None:
    """The run that trained this adapter under this run key and holds no version yet: register
    continues it."""
    runs = client.search_runs([experiment_id], f"tags.`{RUN_KEY_TAG}` = '{run_key}' and tags.`{STAGE_TAG}` = "
                                               f"'training' and tags.`{ADAPTER_TAG}` = '{adapter}'",
                              order_by=["attributes.start_time DESC"])
    for run in runs:
        if run.info.status in ("FINISHED", "RUNNING") and not client.search_model_versions(
                f"run_id='{run.info.run_id}'"):
            return str(run.info.run_id)
    return None


SPLIT_CONTEXTS = {"train": "training", "validation": "validation", "test": "test"}


def log_datasets(cfg: PipelineConfig, run_dir: Path, fingerprint: str) -> dict[str, Any]:
    """The run's data as MLflow dataset inputs (the Datasets panel): each split file from the configured
    source under the snapshot's fingerprint, in its context (training, validation, test)."""
    d = cfg.data
    if d.is_local:
        with warnings.catch_warnings():  # MLflow 3.17 registers its local-file source twice and warns
            warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted")
            source: Any = resolve_dataset_source(d.uri)
    else:
        source = HuggingFaceDatasetSource(path=d.source, split=d.split, revision=d.revision)
    name = Path(d.source).stem if d.is_local else d.source
    logged = {}
    for split, context in SPLIT_CONTEXTS.items():
        rows = read_split(run_dir / "splits", split)
        if not rows:
            continue
        frame = pd.DataFrame([{"key": ex.key, "QUESTION": ex.question, "CONTEXTS": list(ex.contexts),
                               "LONG_ANSWER": ex.answer, "final_decision": ex.decision} for ex in rows])
        logged[split] = mlflow.data.from_pandas(frame, source=source, name=f"{name} ({split})",
                                                digest=fingerprint[:16])
        mlflow.log_input(logged[split], context=context)
    return logged
