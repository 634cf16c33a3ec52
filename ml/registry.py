"""MLflow: one run per pipeline run, one registered version per trained adapter, aliases for promotion.

Order matters for "nothing half-written": the run gets params, metrics and
artifacts first, the model version is registered last, and only the promote
step moves the `champion` alias. A retried task finds the version its first
attempt registered instead of registering a second one.
"""

from __future__ import annotations

import json
import logging
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import yaml
from mlflow import MlflowClient
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException

from ml.config import PipelineConfig, RegistryConfig, project_root, resolve_path
from ml.plots import loss_curve
from ml.prompt import PromptFormat
from ml.serving import signature

log = logging.getLogger(__name__)

RUN_KEY_TAG = "pipeline.run_key"


@dataclass(frozen=True)
class Champion:
    version: str
    run_id: str | None
    model_dir: str  # downloaded pyfunc folder
    adapter_dir: str
    base_model: str  # as configured when it was trained (hub id or path)
    base_path: str | None  # the base weights shipped inside the model, if any


@dataclass(frozen=True)
class Decision:
    promote: bool
    challenger_loss: float
    baseline_loss: float
    baseline: str  # "champion v3" or "base model"
    min_delta: float
    reason: str


@dataclass(frozen=True)
class Registered:
    run_id: str
    version: str
    model_uri: str


def decide(challenger_loss: float, baseline_loss: float, baseline: str, min_delta: float) -> Decision:
    """Promote only on a strict improvement of more than `min_delta` in held-out loss per token."""
    improvement = baseline_loss - challenger_loss
    promote = improvement > min_delta
    verb = "beats" if promote else "does not beat"
    reason = (f"challenger {challenger_loss:.4f} {verb} {baseline} {baseline_loss:.4f} "
              f"by more than min_delta={min_delta:g} (improvement {improvement:+.4f})")
    return Decision(promote, challenger_loss, baseline_loss, baseline, min_delta, reason)


def connect(reg: RegistryConfig) -> MlflowClient:
    if reg.tracking_uri:
        mlflow.set_tracking_uri(reg.tracking_uri)
    return MlflowClient()


def ensure_experiment(reg: RegistryConfig) -> str:
    client = connect(reg)
    exp = client.get_experiment_by_name(reg.experiment)
    if exp is not None:
        return str(exp.experiment_id)
    location = None
    if reg.artifact_location and not mlflow.get_tracking_uri().startswith(("http://", "https://")):
        # Local stores need an explicit home for artifacts; a server proxies its own.
        location = resolve_path(reg.artifact_location).as_uri()
    return str(client.create_experiment(reg.experiment, artifact_location=location))


def champion(reg: RegistryConfig, dst: Path) -> Champion | None:
    """The current champion, downloaded to `dst`, or None when no version holds the alias."""
    client = connect(reg)
    try:
        mv = client.get_model_version_by_alias(reg.model_name, reg.champion_alias)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        raise
    model_dir = Path(mlflow.artifacts.download_artifacts(
        artifact_uri=f"models:/{reg.model_name}/{mv.version}", dst_path=str(dst)))
    artifacts = yaml.safe_load((model_dir / "MLmodel").read_text())["flavors"]["python_function"]["artifacts"]
    embedded = artifacts.get("base_model")
    base = mv.tags.get("base_model", "")
    log.info("champion is version %s of %s (base %s)", mv.version, reg.model_name, base)
    return Champion(str(mv.version), mv.run_id, str(model_dir), str(model_dir / artifacts["adapter"]["path"]),
                    base, str(model_dir / embedded["path"]) if embedded else None)


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=project_root(), capture_output=True,
                             text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def find_registered(reg: RegistryConfig, run_key: str) -> Registered | None:
    """The version an earlier attempt of this pipeline run registered, if any."""
    client = connect(reg)
    exp = client.get_experiment_by_name(reg.experiment)
    if exp is None:
        return None
    runs = client.search_runs([exp.experiment_id], f"tags.`{RUN_KEY_TAG}` = '{run_key}'")
    for run in runs:
        try:
            versions = client.search_model_versions(f"name='{reg.model_name}' and run_id='{run.info.run_id}'")
        except MlflowException:
            continue
        if versions:
            v = versions[0]
            return Registered(run.info.run_id, str(v.version), f"models:/{reg.model_name}/{v.version}")
    return None


def _log_curve(client: MlflowClient, run_id: str, history: list[dict[str, Any]]) -> None:
    metrics = []
    for row in history:
        step = int(row.get("step", 0))
        for src, dst in (("loss", "train_loss"), ("eval_loss", "val_loss"),
                         ("learning_rate", "learning_rate"), ("grad_norm", "grad_norm")):
            if src in row:
                metrics.append(Metric(dst, float(row[src]), 0, step))
    for i in range(0, len(metrics), 900):  # log_batch takes at most 1000 metrics
        client.log_batch(run_id, metrics=metrics[i:i + 900])


def log_and_register(cfg: PipelineConfig, run_key: str, run_dir: Path, *, tags: dict[str, str],
                     metrics: dict[str, float], decision: Decision, samples: list[dict[str, str]]) -> Registered:
    """Log one MLflow run with everything the run produced and register its adapter as a new version."""
    reg = cfg.registry
    existing = find_registered(reg, run_key)
    if existing:
        log.info("run %s already registered version %s; not registering again", run_key, existing.version)
        return existing
    experiment_id = ensure_experiment(reg)
    client = MlflowClient()
    history = json.loads((run_dir / "train" / "log_history.json").read_text())
    adapter_dir = run_dir / "train" / "adapter"

    all_tags = {RUN_KEY_TAG: run_key, "base_model": cfg.model.base_model, "profile": cfg.profile,
                "decision": "promote" if decision.promote else "reject", **tags}
    commit = git_commit()
    if commit:
        all_tags["mlflow.source.git.commit"] = commit
    with mlflow.start_run(experiment_id=experiment_id, run_name=run_key, tags=all_tags) as run:
        run_id = run.info.run_id
        mlflow.log_params({k: json.dumps(v) if isinstance(v, (list, dict)) else v
                           for k, v in cfg.flat().items()})
        _log_curve(client, run_id, history)
        mlflow.log_metrics(metrics)
        mlflow.log_dict(asdict(decision), "reports/decision.json")
        with tempfile.TemporaryDirectory() as tmp:
            png = loss_curve(history, Path(tmp) / "loss_curve.png", title=f"{cfg.profile}: {run_key}",
                             test_losses={"challenger (test)": decision.challenger_loss,
                                          f"{decision.baseline} (test)": decision.baseline_loss})
            mlflow.log_artifact(str(png), "reports")
        for report in sorted((run_dir / "reports").glob("*")):
            mlflow.log_artifact(str(report), "reports")
        if samples:
            mlflow.log_table(pd.DataFrame(samples), artifact_file="reports/sample_generations.json")

        artifacts = {"adapter": str(adapter_dir)}
        local_base = resolve_path(cfg.model.base_model)
        if local_base.is_dir():  # a small local base (the demo's) travels with the model
            gib = sum(f.stat().st_size for f in local_base.rglob("*") if f.is_file()) / 2**30
            if gib <= reg.embed_base_max_gib:
                artifacts["base_model"] = str(local_base)
            else:
                log.warning("the base model %s (%.1f GiB) stays out of the registered model, which refers to "
                            "it by path (registry.embed_base_max_gib=%g)", local_base, gib, reg.embed_base_max_gib)
        model_config = {"base_model": cfg.model.base_model, "revision": cfg.model.revision,
                        "load_in_4bit": cfg.model.load_in_4bit, "dtype": cfg.model.dtype,
                        "prompt_format": PromptFormat.from_config(cfg).to_dict()}
        info = mlflow.pyfunc.log_model(
            name="model", python_model=str(Path(__file__).parent / "serving.py"), artifacts=artifacts,
            model_config=model_config,
            code_paths=[str(Path(__file__).parent)], signature=signature(),
            pip_requirements=_pip_requirements())
        # Registration comes last: a run that failed above leaves no version behind.
        mv = mlflow.register_model(info.model_uri, reg.model_name,
                                   tags={k: v for k, v in all_tags.items() if not k.startswith("mlflow.")})
    for key, value in (("challenger_loss", decision.challenger_loss), ("baseline_loss", decision.baseline_loss),
                       ("baseline", decision.baseline), ("decision_reason", decision.reason)):
        client.set_model_version_tag(reg.model_name, mv.version, key, str(value))
    log.info("logged run %s and registered %s version %s", run_id, reg.model_name, mv.version)
    return Registered(run_id, str(mv.version), f"models:/{reg.model_name}/{mv.version}")


def log_failed_validation(cfg: PipelineConfig, run_key: str, run_dir: Path, snapshot: dict[str, Any]) -> str:
    """A run that records why a retrain stopped at the gate: tags, the reports, status FAILED.

    No model, no version: the registry itself is untouched."""
    experiment_id = ensure_experiment(cfg.registry)
    tags = {RUN_KEY_TAG: run_key, "pipeline.stage": "validation", "validation": "failed",
            "data_fingerprint": snapshot["fingerprint"], "data_source": snapshot["source"], "profile": cfg.profile}
    with mlflow.start_run(experiment_id=experiment_id, run_name=f"{run_key} (gate failed)", tags=tags) as run:
        mlflow.log_metric("dataset_rows", snapshot["rows"])
        for report in sorted((run_dir / "reports").glob("validation.*")):
            mlflow.log_artifact(str(report), "reports")
        mlflow.end_run(status="FAILED")
    log.info("gate failure logged as MLflow run %s", run.info.run_id)
    return str(run.info.run_id)


def _pip_requirements() -> list[str]:
    reqs = []
    for pkg in ("mlflow", "torch", "transformers", "peft", "accelerate", "pydantic", "pandas"):
        try:
            reqs.append(f"{pkg}=={metadata.version(pkg)}".replace("+cpu", ""))
        except metadata.PackageNotFoundError:
            reqs.append(pkg)
    return reqs


def promote_version(reg: RegistryConfig, registered: Registered, decision: Decision) -> None:
    """Move @champion to the version; the one it replaces keeps @previous_champion."""
    client = connect(reg)
    name, version = reg.model_name, registered.version
    try:
        previous = client.get_model_version_by_alias(name, reg.champion_alias)
    except MlflowException:
        previous = None
    if previous is not None and str(previous.version) != version:
        client.set_registered_model_alias(name, reg.previous_alias, previous.version)
        client.set_model_version_tag(name, previous.version, "superseded_by", version)
    client.set_registered_model_alias(name, reg.champion_alias, version)
    _record(client, reg, registered, "promoted", decision)
    log.info("promoted %s version %s to @%s", name, version, reg.champion_alias)


def reject_version(reg: RegistryConfig, registered: Registered, decision: Decision) -> None:
    """Tag the version rejected; every alias stays where it is."""
    _record(connect(reg), reg, registered, "rejected", decision)
    log.info("rejected %s version %s: %s", reg.model_name, registered.version, decision.reason)


def _record(client: MlflowClient, reg: RegistryConfig, registered: Registered, outcome: str,
            decision: Decision) -> None:
    client.set_model_version_tag(reg.model_name, registered.version, "decision", outcome)
    client.set_tag(registered.run_id, "decision", outcome)
    client.set_tag(registered.run_id, "decision_reason", decision.reason)
