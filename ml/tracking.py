"""MLflow runs, beside the registry's versions (ml/registry.py) and aliases (ml/champion.py): the
connection to the tracking server and its experiment, the run of a training attempt while it
trains, the evidence register adds to it (metrics, reports, plots, the data as dataset inputs),
and the runs of retrains that did not train (skipped, stopped at the gate).

Every run carries its pipeline run key (`RUN_KEY_TAG`), so that a retried task finds its own.
A step connects once (`connect`) and passes the client on.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any

import mlflow
import mlflow.data
import pandas as pd
from mlflow import MlflowClient
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.huggingface_dataset_source import HuggingFaceDatasetSource
from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException
from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

from ml.config import PipelineConfig, RegistryConfig, move_credentials, redact, resolve_path, tracking_uri
from ml.data import read_split
from ml.errors import RegistryUnavailable
from ml.identity import adapter_hash, code_commit, config_hash
from ml.plots import loss_curve
from ml.promotion import Decision
from ml.review_card import param_value
from ml.runs import RunPaths, TrainFiles

log = logging.getLogger(__name__)

# MLflow logs through a handler of its own on stderr, which an Airflow task shows as ERROR lines
# ("Successfully terminated system metrics monitoring!"): its records go to the root logger
# instead, at their own level, as the rest of the task's log does.
logging.getLogger("mlflow").handlers.clear()
logging.getLogger("mlflow").propagate = True

RUN_KEY_TAG = "pipeline.run_key"
STAGE_TAG = "pipeline.stage"  # training, validation (a failed gate), skipped
ADAPTER_TAG = "adapter_sha256"  # of the adapter a training run wrote, and a version holds
# The experiment's kind as MLflow records it (what its UI's kind selector writes): this is classic
# model training, not a GenAI app. MLflow 3.17's UI chooses its view by the workflow switch instead
# (`?workflowType=machine_learning` in a link, else the browser's last choice, GenAI by default:
# plugins/mlflow_links.py puts it in every link); the tag is what the experiment itself says, read by
# MLflow UIs that decide by the experiment (3.x before the switch, Databricks).
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
# A run's decision as a column of the runs table: the `decision` tag (promoted, rejected,
# needs_review, skipped, gate_failed) and the metric `promoted` (1 or 0), which sorts and charts.
DECISION_TAG, PROMOTED_METRIC = "decision", "promoted"
TEST_SPLIT_ARTIFACT = "splits/test.jsonl"  # in a version's run: the test rows it was evaluated on


def run_title(profile: str, run_key: str, decision: str | None = None) -> str:
    """An MLflow run's name, that tells runs apart in the runs table: the profile, the run's date
    (and time, for a run not started at midnight: a manual trigger) from its run key (Airflow's run
    ids hold it: `scheduled__2026-12-06T00:00:00+00:00`), today's UTC date for a key without one,
    and the decision once known: `demo 2026-12-06 14:38 · promoted`."""
    found = re.search(r"(\d{4}-\d{2}-\d{2})(?:[T ](\d{2}:\d{2}))?", run_key)
    when = (f"{found[1]}" + (f" {found[2]}" if found[2] and found[2] != "00:00" else "")) if found else \
        datetime.now(UTC).strftime("%Y-%m-%d")
    return f"{profile} {when}" + (f" · {decision.replace('_', ' ')}" if decision else "")


def connect(reg: RegistryConfig) -> MlflowClient:
    """A client of the configured tracking server; the process's fluent MLflow calls use it too.
    Without one configured, refused (ml.config.tracking_uri)."""
    # MLflow prints the URI it uses ("View run ... at: <uri>"): one with `user:password@`
    # ($MLFLOW_TRACKING_URI; the config's has none) goes on without, its credentials in the environment.
    # Always set, so that the fluent calls use the same URI as the client, never MLflow's own default
    clean = move_credentials(tracking_uri(reg))
    mlflow.set_tracking_uri(clean)
    # MLflow's own defaults wait 120 s per request and retry 7 times with backoff: minutes per call
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(int(math.ceil(reg.request_timeout_s)))
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = str(reg.request_retries)
    return MlflowClient()


def check_writable(reg: RegistryConfig) -> MlflowClient:
    """Before any training: the tracking server answers and takes this user's writes (the run's
    experiment exists or is created, and gets a tag); returns the connected client. Fails naming
    the tracking URI."""
    try:
        client = connect(reg)
        experiment_id = ensure_experiment(client, reg)
        client.set_experiment_tag(experiment_id, "pipeline.last_check", datetime.now(UTC).isoformat(timespec="seconds"))
    except (MlflowException, OSError) as exc:
        uri = redact(mlflow.get_tracking_uri())
        raise RegistryUnavailable(
            f"MLflow at {uri} cannot be used by this run (nothing was trained): {redact(_first_line(exc))}. "
            "Check MLFLOW_TRACKING_URI, the server, and MLFLOW_TRACKING_USERNAME/PASSWORD") from exc
    return client


def ensure_experiment(client: MlflowClient, reg: RegistryConfig) -> str:
    exp = client.get_experiment_by_name(reg.experiment)
    if exp is not None:
        if any(exp.tags.get(k) != v for k, v in EXPERIMENT_KIND.items()):  # made before this tag, or by hand
            for key, value in EXPERIMENT_KIND.items():
                client.set_experiment_tag(exp.experiment_id, key, value)
        return str(exp.experiment_id)
    location = None
    if reg.artifact_location and not mlflow.get_tracking_uri().startswith(("http://", "https://")):
        # Local stores need an explicit home for artifacts; a server proxies its own.
        location = resolve_path(reg.artifact_location).as_uri()
    try:
        return str(client.create_experiment(reg.experiment, artifact_location=location, tags=EXPERIMENT_KIND))
    except MlflowException as exc:  # two runs started together on a new server: the other created it
        if exc.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise
        exp = client.get_experiment_by_name(reg.experiment)
        if exp is None:
            raise
        return str(exp.experiment_id)


def log_skipped(client: MlflowClient, cfg: PipelineConfig, run_key: str, reason: str,
                snapshot: dict[str, Any]) -> str:
    """A finished run that says why this retrain did not train: nothing changed since the champion."""
    experiment_id = ensure_experiment(client, cfg.registry)
    tags = {RUN_KEY_TAG: run_key, STAGE_TAG: "skipped", DECISION_TAG: "skipped", "decision_reason": reason,
            "data_fingerprint": snapshot["fingerprint"], "profile": cfg.profile, "mlflow.note.content": reason}
    with mlflow.start_run(experiment_id=experiment_id, run_name=run_title(cfg.profile, run_key, "skipped"),
                          tags=tags) as run:
        mlflow.log_metrics({"dataset_rows": snapshot["rows"], PROMOTED_METRIC: 0})
    return str(run.info.run_id)


def log_failed_validation(client: MlflowClient, cfg: PipelineConfig, run_key: str, paths: RunPaths,
                          snapshot: dict[str, Any]) -> str:
    """A run that records why a retrain stopped at the gate: tags, the reports, status FAILED.

    No model, no version: the registry itself is untouched."""
    experiment_id = ensure_experiment(client, cfg.registry)
    tags = {RUN_KEY_TAG: run_key, STAGE_TAG: "validation", "validation": "failed", DECISION_TAG: "gate_failed",
            "data_fingerprint": snapshot["fingerprint"], "data_source": snapshot["source"], "profile": cfg.profile}
    with mlflow.start_run(experiment_id=experiment_id, run_name=run_title(cfg.profile, run_key, "gate_failed"),
                          tags=tags) as run:
        mlflow.log_metrics({"dataset_rows": snapshot["rows"], PROMOTED_METRIC: 0})
        for report in sorted(paths.reports.glob(paths.validation.stem + ".*")):
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

    def __init__(self, client: MlflowClient, cfg: PipelineConfig, run_key: str, train_dir: Path,
                 every_s: float = 2.0) -> None:
        self.client, self.cfg, self.run_key, self.every_s = client, cfg, run_key, every_s
        files = TrainFiles(train_dir)
        self.file, self.adapter, self.layout, self.layout_logged = files.metrics, files.adapter, files.layout, False
        self.offset, self.stop, self.thread = 0, threading.Event(), threading.Thread(target=self._poll, daemon=True)
        self.run_id = ""

    def __enter__(self) -> TrainingRun:
        experiment_id = ensure_experiment(self.client, self.cfg.registry)
        run = mlflow.start_run(experiment_id=experiment_id, run_name=run_title(self.cfg.profile, self.run_key),
                               log_system_metrics=False,
                               tags={RUN_KEY_TAG: self.run_key, STAGE_TAG: "training", "profile": self.cfg.profile})
        self.run_id = run.info.run_id
        # started and stopped here rather than by start_run/end_run: stopped even where the run's end is not taken
        self.system = SystemMetricsMonitor(self.run_id, sampling_interval=self.every_s, samples_before_logging=1)
        self.system.start()
        mlflow.log_params({k: param_value(v) for k, v in self.cfg.flat().items()})
        # an earlier attempt's records are not this run's (and the trainer starts the file anew)
        self.file.unlink(missing_ok=True)
        self.layout.unlink(missing_ok=True)
        self.thread.start()
        return self

    def relay(self) -> None:
        """What the trainer appended since the last call, as metrics of the run; the activation layout it
        chose before step 1 (`train.uncheckpointed_layers: auto`), once, as params `train.layout.*`."""
        if not self.layout_logged and self.layout.exists():
            layout = json.loads(self.layout.read_text(encoding="utf-8"))
            self.client.log_batch(self.run_id, params=[Param(f"train.layout.{k}", param_value(v))
                                                        for k, v in layout.items()])
            self.layout_logged = True
        if not self.file.exists():
            return
        if self.file.stat().st_size < self.offset:  # started anew under us: read it from its start
            self.offset = 0
        with self.file.open(encoding="utf-8") as f:
            f.seek(self.offset)
            lines = f.readlines()
        complete = [line for line in lines if line.endswith("\n")]  # a line being written waits
        log_batches(self.client, self.run_id, curve_metrics([json.loads(line) for line in complete]))
        self.offset += sum(len(line.encode("utf-8")) for line in complete)  # sent: a failed send is sent again

    def _poll(self) -> None:
        while not self.stop.wait(self.every_s):
            try:
                self.relay()
            except (MlflowException, OSError, ValueError) as exc:  # the server away a moment: the next poll
                log.warning("relaying training metrics to MLflow: %s", exc)  # catches up

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        """Closes the run. The trainer's files are on disk by now: a tracking server away at this moment
        is waited for (`CLOSE_WAITS_S`), then left behind, and never fails a finished training (register
        logs what this run lacks, and closes it); a failed training keeps its own error."""
        self.stop.set()
        self.thread.join()
        with contextlib.suppress(MlflowException, OSError):
            self.system.finish()
        status = "FAILED" if error is not None else "FINISHED"

        def close() -> None:
            self.relay()
            if error is not None:
                self.client.log_text(self.run_id, str(error), "train/log_tail.txt")
            else:  # which adapter it wrote: register continues only the run of the adapter it registers
                self.client.set_tag(self.run_id, ADAPTER_TAG, adapter_hash(self.adapter))
            self.client.set_terminated(self.run_id, status)

        for wait in (*CLOSE_WAITS_S, None):
            try:
                close()
                break
            except (MlflowException, OSError) as exc:
                if wait is None:
                    log.warning("MLflow did not take the end of training run %s (%s); the trained files are "
                                "kept in %s and register records them", self.run_id, _first_line(exc),
                                self.file.parent)
                else:
                    log.warning("closing training run %s: %s; trying again in %.0f s", self.run_id,
                                _first_line(exc), wait)
                    time.sleep(wait)
        with contextlib.suppress(MlflowException, OSError):  # no longer the active run, taken or not
            mlflow.end_run(status)


CLOSE_WAITS_S = (5.0, 20.0, 60.0)  # backoff before a training run's end is left to register


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


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


def evidence_tags(cfg: PipelineConfig, run_key: str, ev: dict[str, Any], snap: dict[str, Any],
                  tags: dict[str, str]) -> dict[str, str]:
    """The tags of a version's run: its key, base, profile, decision, data, training settings and
    identities (ml/identity.py), and `tags` (the Airflow run, say)."""
    run_tags = {RUN_KEY_TAG: run_key, "base_model": cfg.model.base_model, "profile": cfg.profile,
                "decision": ev["decision"]["outcome"], "data_fingerprint": snap["fingerprint"],
                "data_source": snap["source"], "config_sha256": config_hash(cfg), **ev["identity"], **tags}
    commit = code_commit()
    if commit:
        run_tags["mlflow.source.git.commit"] = commit
    return run_tags


@contextlib.contextmanager
def evidence_run(client: MlflowClient, cfg: PipelineConfig, paths: RunPaths, run_key: str, *,
                 metrics: dict[str, float], tags: dict[str, str], decision: Decision,
                 samples: list[dict[str, str]]) -> Iterator[tuple[str, dict[str, Any]]]:
    """The run that holds a version's evidence, active inside the block: the training run of this
    adapter continued (it has the curve and system metrics already), else a new one with the params
    and the curve. It gets the metrics, the data as dataset inputs, the decision, the loss plot, the
    run folder's reports and the sample answers; yields (run id, the logged datasets), for the model
    and its version to be logged inside it. `tags` must carry the adapter's hash (ADAPTER_TAG)."""
    experiment_id = ensure_experiment(client, cfg.registry)
    training = training_run(client, experiment_id, run_key, tags[ADAPTER_TAG])
    _close_abandoned(client, experiment_id, run_key, keep=training)
    history = json.loads(paths.trained.history.read_text())
    # tagged from its first write, so that a retry finds what a killed attempt left (_close_abandoned)
    opened = (mlflow.start_run(run_id=training, log_system_metrics=False, tags=tags) if training else
              mlflow.start_run(experiment_id=experiment_id, run_name=run_title(cfg.profile, run_key), tags=tags))
    with opened as run:
        run_id = run.info.run_id
        if training is None:  # trained without a supervising run: its params and curve from here
            mlflow.log_params({k: param_value(v) for k, v in cfg.flat().items()})
            metrics_file = paths.trained.metrics
            records = ([json.loads(line) for line in metrics_file.read_text(encoding="utf-8").splitlines()]
                       if metrics_file.exists() else history)
            log_batches(client, run_id, curve_metrics(records))
        mlflow.log_metrics(metrics)
        datasets = log_datasets(cfg, paths, tags["data_fingerprint"])
        mlflow.log_dict(asdict(decision), "reports/decision.json")
        with tempfile.TemporaryDirectory() as tmp:
            png = loss_curve(history, Path(tmp) / "loss_curve.png", title=f"{cfg.profile}: {run_key}",
                             test_losses={"challenger (test)": decision.challenger_loss,
                                          f"{decision.baseline} (test)": decision.baseline_loss})
            mlflow.log_artifact(str(png), "reports")
        for report in sorted(p for p in paths.reports.glob("*") if p.suffix != ".part"):  # half-written: not a report
            mlflow.log_artifact(str(report), "reports")
        # the rows an export of its version is checked on (ml/export.py), without the run folder
        mlflow.log_artifact(str(paths.split("test")), str(Path(TEST_SPLIT_ARTIFACT).parent))
        if samples:
            mlflow.log_table(pd.DataFrame(samples), artifact_file="reports/sample_generations.json")
        yield run_id, datasets


def runs_of(client: MlflowClient, reg: RegistryConfig, run_key: str) -> list[str]:
    """The ids of every MLflow run of a pipeline run key, in the configured experiment."""
    exp = client.get_experiment_by_name(reg.experiment)
    if exp is None:
        return []
    return [run.info.run_id for run in client.search_runs([exp.experiment_id], f"tags.`{RUN_KEY_TAG}` = '{run_key}'")]


def record_outcome(client: MlflowClient, run_id: str, outcome: str, decision: Decision) -> None:
    """What became of the run's version (promoted, rejected, needs_review), why, and each guardrail's
    verdict, on the run; its name ends with the outcome, and its `promoted` metric says 1 or 0."""
    tags = client.get_run(run_id).data.tags
    if "profile" in tags and RUN_KEY_TAG in tags:  # the name it started with, and what became of it
        client.set_tag(run_id, "mlflow.runName", run_title(tags["profile"], tags[RUN_KEY_TAG], outcome))
    client.set_tag(run_id, DECISION_TAG, outcome)
    client.log_metric(run_id, PROMOTED_METRIC, 1 if outcome == "promoted" else 0)
    client.set_tag(run_id, "decision_reason", decision.reason)
    if decision.guardrails:
        client.set_tag(run_id, "guardrails", "; ".join(f"{g.metric} {g.verdict}" for g in decision.guardrails))


def finish_run(client: MlflowClient, run_id: str) -> None:
    """A run left unfinished by an attempt killed after registering: everything before the version was
    written (the version comes last in the run), so it is marked FINISHED."""
    status = client.get_run(run_id).info.status
    if status != "FINISHED":
        log.warning("finishing run %s, left %s by an attempt that stopped after registering", run_id, status)
        client.set_terminated(run_id, "FINISHED")


def _close_abandoned(client: MlflowClient, experiment_id: str, run_key: str, keep: str | None = None) -> None:
    """Runs of this run key left RUNNING by an attempt that stopped before it registered a version
    (killed, or the server went away): marked KILLED, so that only the retry's run looks alive
    (`keep`: the training run the retry continues)."""
    for run in client.search_runs([experiment_id], f"tags.`{RUN_KEY_TAG}` = '{run_key}' and "
                                                   "attributes.status = 'RUNNING'"):
        if run.info.run_id == keep or client.search_model_versions(f"run_id='{run.info.run_id}'"):
            continue  # it registered a version (of another adapter): not abandoned
        log.warning("closing run %s of %s, left RUNNING by an attempt that stopped before registering",
                    run.info.run_id, run_key)
        client.set_tag(run.info.run_id, "pipeline.note", "an attempt stopped before registering; a retry took over")
        client.set_terminated(run.info.run_id, "KILLED")


def run_params(client: MlflowClient, run_id: str) -> dict[str, str] | None:
    """The params an MLflow run logged (a champion's settings), or None if the run is gone."""
    try:
        return dict(client.get_run(run_id).data.params)
    except MlflowException:
        return None


SPLIT_CONTEXTS = {"train": "training", "validation": "validation", "test": "test"}


def log_datasets(cfg: PipelineConfig, paths: RunPaths, fingerprint: str) -> dict[str, Any]:
    """The run's data as MLflow dataset inputs (the Datasets panel): each split file from the configured
    source under the snapshot's fingerprint, in its context (training, validation, test)."""
    d = cfg.data
    if d.is_local:
        with warnings.catch_warnings():  # MLflow registers its local-file source twice and warns about it
            warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted")
            source: Any = resolve_dataset_source(d.uri)
    else:
        source = HuggingFaceDatasetSource(path=d.source, split=d.split, revision=d.revision)
    name = Path(d.source).stem if d.is_local else d.source
    logged = {}
    for split, context in SPLIT_CONTEXTS.items():
        rows = read_split(paths.splits, split)
        if not rows:
            continue
        frame = pd.DataFrame([{"key": ex.key, "QUESTION": ex.question, "CONTEXTS": list(ex.contexts),
                               "LONG_ANSWER": ex.answer, "final_decision": ex.decision} for ex in rows])
        logged[split] = mlflow.data.from_pandas(frame, source=source, name=f"{name} ({split})",
                                                digest=fingerprint[:16])
        mlflow.log_input(logged[split], context=context)
    return logged
