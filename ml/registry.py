"""The MLflow registry: one registered version per trained adapter, aliases for promotion, and the
run that holds the version's evidence (runs themselves: ml/tracking.py).

Order matters for "nothing half-written": the run gets params, metrics and
artifacts first, the model version is registered last, and only the promote
step moves the `champion` alias. A retried task finds the version its first
attempt registered (same run key and same adapter content) instead of registering a second one.
Every alias move happens under `registry_lock`, after re-reading the alias it replaces.
"""

from __future__ import annotations

import contextlib
import fcntl
import getpass
import hashlib
import json
import logging
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import yaml
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.models import Model

from ml.config import PipelineConfig, RegistryConfig, resolve_path
from ml.errors import ConfigError, RegistryConflict, RegistryUnavailable
from ml.plots import loss_curve
from ml.promotion import Decision
from ml.prompt import PromptFormat
from ml.review_card import param_value
from ml.runs import TRAIN_METRICS, Champion
from ml.signature import signature
from ml.tracking import (
    ADAPTER_TAG,
    RUN_KEY_TAG,
    connect,
    curve_metrics,
    ensure_experiment,
    git_commit,
    log_batches,
    log_datasets,
    training_run,
)

log = logging.getLogger(__name__)

SET_BY_TAG = "champion_set_by"  # on the registered model: "pipeline <run key>" or "manual <user>"


@dataclass(frozen=True)
class Registered:
    run_id: str
    version: str
    model_uri: str


def _alias_version(client: MlflowClient, name: str, alias: str) -> Any | None:
    """The version holding `alias`, None when none does; any other failure is raised (an alias
    read wrongly as absent would lose `previous_champion`)."""
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        if exc.error_code == "PERMISSION_DENIED" and not _visible(client, name):
            # A server with authentication answers 403, not 404, for a model that does not exist
            # (it tells no one what exists). A model this account cannot see has no champion for
            # it: registering creates the model, owned by this account, or fails naming the owner
            # problem when another account made it (_create_version).
            return None
        raise


def _visible(client: MlflowClient, name: str) -> bool:
    """Whether this account can see the registered model (searches list only readable ones)."""
    return bool(client.search_registered_models(filter_string=f"name = '{name}'", max_results=1))


def champion_version(reg: RegistryConfig) -> str | None:
    mv = _alias_version(connect(reg), reg.model_name, reg.champion_alias)
    return str(mv.version) if mv is not None else None


def champion_tags(reg: RegistryConfig) -> dict[str, str] | None:
    """The champion version's tags and its number (`version`), or None when there is no champion."""
    mv = _alias_version(connect(reg), reg.model_name, reg.champion_alias)
    return {**mv.tags, "version": str(mv.version)} if mv is not None else None


def champion(reg: RegistryConfig, dst: Path) -> Champion | None:
    """The current champion, downloaded to `dst`, or None when no version holds the alias."""
    mv = _alias_version(connect(reg), reg.model_name, reg.champion_alias)
    if mv is None:
        return None
    model_dir = Path(mlflow.artifacts.download_artifacts(
        artifact_uri=f"models:/{reg.model_name}/{mv.version}", dst_path=str(dst)))
    flavor = yaml.safe_load((model_dir / "MLmodel").read_text())["flavors"]["python_function"]
    artifacts, model_config = flavor["artifacts"], flavor.get("model_config") or {}
    embedded = artifacts.get("base_model")
    base = mv.tags.get("base_model", "")
    try:
        rows_file = mlflow.artifacts.download_artifacts(run_id=mv.run_id, artifact_path="reports/train_rows.json",
                                                        dst_path=str(dst / "run"))
        trained_rows = json.loads(Path(rows_file).read_text())
    except (MlflowException, OSError):  # a version from before rows were recorded
        trained_rows = None
    log.info("champion is version %s of %s (base %s)", mv.version, reg.model_name, base)
    return Champion(str(mv.version), mv.run_id, str(model_dir), str(model_dir / artifacts["adapter"]["path"]),
                    base, str(model_dir / embedded["path"]) if embedded else None, mv.tags.get("base_identity"),
                    model_config.get("prompt_format"), trained_rows)


def find_registered(reg: RegistryConfig, run_key: str, adapter: str) -> Registered | None:
    """The version an earlier attempt of this pipeline run registered for this very adapter, if any
    (another attempt's adapter under the same key is another version)."""
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
        for v in versions:
            if v.tags.get(ADAPTER_TAG) == adapter:
                return Registered(run.info.run_id, str(v.version), f"models:/{reg.model_name}/{v.version}")
    return None


def run_params(reg: RegistryConfig, run_id: str) -> dict[str, str] | None:
    """The params an MLflow run logged (a champion's settings), or None if the run is gone."""
    try:
        return dict(connect(reg).get_run(run_id).data.params)
    except MlflowException:
        return None


def describe_version(reg: RegistryConfig, version: str, card: str) -> None:
    """The version's description in MLflow: its review card (ml/review_card.py)."""
    connect(reg).update_model_version(reg.model_name, version, description=card)


def log_and_register(cfg: PipelineConfig, run_key: str, run_dir: Path, *, tags: dict[str, str],
                     metrics: dict[str, float], decision: Decision, samples: list[dict[str, str]],
                     card: str = "") -> Registered:
    """Log one MLflow run with everything the run produced and register its adapter as a new version,
    described by its review `card`. `tags` must carry the evaluated adapter's hash (ADAPTER_TAG)."""
    reg = cfg.registry
    existing = find_registered(reg, run_key, tags[ADAPTER_TAG])
    if existing:
        log.info("run %s already registered version %s; not registering again", run_key, existing.version)
        client = MlflowClient()
        status = client.get_run(existing.run_id).info.status
        if status != "FINISHED":
            # An attempt killed after registering: everything before the version was written (the
            # version comes last in the run); finish what came after it.
            log.warning("finishing run %s, left %s by an attempt that stopped after registering", existing.run_id,
                        status)
            client.set_terminated(existing.run_id, "FINISHED")
        _decision_tags(client, reg, existing.version, decision)
        describe_version(reg, existing.version, card)
        return existing
    experiment_id = ensure_experiment(reg)
    client = MlflowClient()
    # the run that trained this adapter holds its curve and system metrics already: continued
    training = training_run(client, experiment_id, run_key, tags[ADAPTER_TAG])
    _close_abandoned(client, experiment_id, run_key, keep=training)
    history = json.loads((run_dir / "train" / "log_history.json").read_text())
    adapter_dir = run_dir / "train" / "adapter"

    all_tags = {RUN_KEY_TAG: run_key, "base_model": cfg.model.base_model, "profile": cfg.profile,
                "decision": decision.outcome, **tags}
    commit = git_commit()
    if commit:
        all_tags["mlflow.source.git.commit"] = commit
    # tagged from its first write, so that a retry finds what a killed attempt left (_close_abandoned)
    opened = (mlflow.start_run(run_id=training, log_system_metrics=False, tags=all_tags) if training else
              mlflow.start_run(experiment_id=experiment_id, run_name=run_key, tags=all_tags))
    with opened as run:
        run_id = run.info.run_id
        if training is None:  # trained without a supervising run: its params and curve from here
            mlflow.log_params({k: param_value(v) for k, v in cfg.flat().items()})
            metrics_file = run_dir / "train" / TRAIN_METRICS
            records = ([json.loads(line) for line in metrics_file.read_text(encoding="utf-8").splitlines()]
                       if metrics_file.exists() else history)
            log_batches(client, run_id, curve_metrics(records))
        mlflow.log_metrics(metrics)
        datasets = log_datasets(cfg, run_dir, tags["data_fingerprint"])
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
        info = Model.log(
            artifact_path=None, name="model", flavor=_Pyfunc, flavor_name="pyfunc.ModelFromCode",
            validate_serving_input=False, python_model=str(Path(__file__).parent / "serving.py"), artifacts=artifacts,
            model_config=model_config, code_paths=[str(Path(__file__).parent)], signature=signature(),
            input_example=_input_example(datasets.get("test")), pip_requirements=_pip_requirements())
        # The model carries its test scores, measured on the test split it names (its page in MLflow).
        mlflow.log_metrics({k: v for k, v in metrics.items() if k.startswith(("test_", "baseline_test_"))},
                           model_id=info.model_id, dataset=datasets.get("test"))
        # Registration comes last: a run that failed above leaves no version behind.
        mv = _create_version(client, reg.model_name, info, run_id,
                             {k: v for k, v in all_tags.items() if k in VERSION_TAGS})
    _decision_tags(client, reg, str(mv.version), decision)
    describe_version(reg, str(mv.version), card)
    log.info("logged run %s and registered %s version %s", run_id, reg.model_name, mv.version)
    return Registered(run_id, str(mv.version), f"models:/{reg.model_name}/{mv.version}")


def _create_version(client: MlflowClient, name: str, info: Any, run_id: str, tags: dict[str, str]) -> Any:
    """`mlflow.register_model` through the client, which prints nothing: the fluent call prints its
    routine messages to stderr, which an Airflow task shows as ERROR lines."""
    try:
        client.create_registered_model(name)
        log.info("created the registered model %s", name)
    except MlflowException as exc:
        if exc.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise
        if not _visible(client, name):
            raise RegistryUnavailable(
                f"the registered model {name!r} exists but this MLflow account cannot read it: grant it "
                "MANAGE on the model (MLflow's admin), or set registry.model_name to a model it owns") from exc
    return client.create_model_version(name, info.model_uri, run_id=run_id, tags=tags, model_id=info.model_id)


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


class _Pyfunc:
    """`mlflow.pyfunc` as the flavor of `Model.log`, told not to check the input example by loading
    the model and predicting at logging time (which `mlflow.pyfunc.log_model` always does): register
    runs on a worker without a GPU, where loading an 8B 4-bit base would fail or fill the memory, to
    record what it already has. Tests load the registered model and predict on its example."""

    __name__ = "mlflow.pyfunc"

    @staticmethod
    def save_model(validate_serving_input: bool = True, **kwargs: Any) -> Any:
        return mlflow.pyfunc.save_model(**kwargs)


def _input_example(test: Any) -> pd.DataFrame | None:
    """The first test question with its contexts (of the test split as logged): what a caller sends."""
    return test.df[["QUESTION", "CONTEXTS"]].head(1) if test is not None else None


# What loading and running the registered model imports (ml/serving.py and the ml modules it uses);
# bitsandbytes loads the base in 4-bit on CUDA.
SERVING_PACKAGES = ("mlflow", "torch", "transformers", "peft", "accelerate", "bitsandbytes", "safetensors",
                    "tokenizers", "huggingface-hub", "datasets", "pydantic", "pyyaml", "pandas", "numpy")


def _pip_requirements() -> list[str]:
    reqs = []
    for pkg in SERVING_PACKAGES:
        try:
            reqs.append(f"{pkg}=={metadata.version(pkg)}".replace("+cpu", ""))
        except metadata.PackageNotFoundError:
            reqs.append(pkg)
    return reqs


# A version's tags, few (MLflow's UI lists them alphabetically, below the review card): the decision
# and its numbers, and what the pipeline compares or finds a version by (the data, the config, the
# adapter, the base, the run key, the Airflow run). Its run has all the rest.
VERSION_TAGS = ("decision", "challenger_loss", "baseline_loss", "baseline", "improvement_interval",
                "data_fingerprint", "config_sha256", ADAPTER_TAG, "base_model", "base_identity", RUN_KEY_TAG,
                "airflow.run_id")


def _decision_tags(client: MlflowClient, reg: RegistryConfig, version: str, decision: Decision) -> None:
    tags = {"challenger_loss": f"{decision.challenger_loss:.4f}", "baseline_loss": f"{decision.baseline_loss:.4f}",
            "baseline": decision.baseline}
    if decision.low is not None:
        tags["improvement_interval"] = (
            f"{decision.improvement:+.4f} [{decision.low:+.4f}, {decision.high:+.4f}] "
            f"({decision.confidence:.0%}, {decision.resamples} resamples, seed {decision.seed})")
    for key, value in tags.items():
        client.set_model_version_tag(reg.model_name, version, key, value)


@contextlib.contextmanager
def registry_lock(reg: RegistryConfig) -> Iterator[None]:
    """One alias move at a time for a registered model, across the processes of this machine (CLI
    runs, local executors); the DAG's registry pool of one slot serialises workers on other hosts."""
    key = hashlib.sha256(f"{mlflow.get_tracking_uri()}|{reg.model_name}".encode()).hexdigest()[:16]
    path = Path(tempfile.gettempdir()) / f"ml-registry-{key}.lock"
    with path.open("w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def check_adapter(reg: RegistryConfig, registered: Registered, adapter: str) -> None:
    """The version must hold the adapter that was evaluated (a re-run under the same key cannot swap it)."""
    mv = connect(reg).get_model_version(reg.model_name, registered.version)
    if mv.tags.get(ADAPTER_TAG) != adapter:
        raise RegistryConflict(f"version {registered.version} holds adapter {mv.tags.get(ADAPTER_TAG)}, not the "
                               f"evaluated {adapter}: it belongs to another attempt; nothing was promoted")


def champion_set_by(reg: RegistryConfig) -> str:
    model = connect(reg).get_registered_model(reg.model_name)
    return str(model.tags.get(SET_BY_TAG, ""))


def move_champion(reg: RegistryConfig, version: str, expected: str | None, set_by: str) -> str | None:
    """Give @champion to `version` if it still is at `expected` (call under `registry_lock`);
    the version it leaves keeps @previous_champion. Returns that version."""
    client = connect(reg)
    name = reg.model_name
    now = champion_version(reg)
    if now != expected:
        raise RegistryConflict(f"@{reg.champion_alias} is at {now}, not {expected}: it moved meanwhile")
    if now is not None and now != version:
        client.set_registered_model_alias(name, reg.previous_alias, now)
        client.set_model_version_tag(name, now, "superseded_by", version)
    client.set_registered_model_alias(name, reg.champion_alias, version)
    client.set_registered_model_tag(name, SET_BY_TAG, set_by)
    return now


def promote_version(reg: RegistryConfig, registered: Registered, decision: Decision, expected: str | None,
                    run_key: str) -> None:
    """Move @champion to the version (under the lock, after the caller re-checked `expected`)."""
    previous = move_champion(reg, registered.version, expected, f"pipeline {run_key}")
    client = connect(reg)
    _decision_tags(client, reg, registered.version, decision)
    _record(client, reg, registered, "promoted", decision)
    log.info("promoted %s version %s to @%s (previous: %s)", reg.model_name, registered.version,
             reg.champion_alias, previous)


def reject_version(reg: RegistryConfig, registered: Registered, decision: Decision) -> None:
    """Tag the version rejected (or needs_review); every alias stays where it is."""
    client = connect(reg)
    _decision_tags(client, reg, registered.version, decision)
    _record(client, reg, registered, "needs_review" if decision.outcome == "needs_review" else "rejected", decision)
    log.info("%s version %s not promoted: %s", reg.model_name, registered.version, decision.reason)


def manual_move(reg: RegistryConfig, version: str | None, reason: str, action: str) -> dict[str, str | None]:
    """A person moves @champion: to `version`, or (rollback, `version` None) back to @previous_champion.
    Recorded on both versions and the registered model: who, when, why."""
    if not reason.strip():
        raise ConfigError("a manual promotion or rollback needs a --reason")
    client = connect(reg)
    who, when = getpass.getuser(), datetime.now(UTC).isoformat(timespec="seconds")
    with registry_lock(reg):
        now = champion_version(reg)
        if version is None:
            previous = _alias_version(client, reg.model_name, reg.previous_alias)
            if previous is None:
                raise RegistryConflict(f"no version holds @{reg.previous_alias}: nothing to roll back to")
            version = str(previous.version)
        try:
            client.get_model_version(reg.model_name, version)
        except MlflowException as exc:
            raise RegistryConflict(f"{reg.model_name} has no version {version}") from exc
        if version == now:
            raise RegistryConflict(f"version {version} already holds @{reg.champion_alias}")
        move_champion(reg, version, now, f"manual {who}")
    note = f"{action} by {who} at {when}: {reason}"
    client.set_model_version_tag(reg.model_name, version, "decision", f"manual {action}")
    client.set_model_version_tag(reg.model_name, version, "manual_decision", note)
    if now is not None:
        client.set_model_version_tag(reg.model_name, now, "manual_decision", f"replaced by v{version}: {note}")
    log.info("%s: @%s %s -> %s", note, reg.champion_alias, now, version)
    return {"champion": version, "previous_champion": now, "by": who, "at": when, "reason": reason}


def _record(client: MlflowClient, reg: RegistryConfig, registered: Registered, outcome: str,
            decision: Decision) -> None:
    client.set_model_version_tag(reg.model_name, registered.version, "decision", outcome)
    client.set_tag(registered.run_id, "decision", outcome)
    client.set_tag(registered.run_id, "decision_reason", decision.reason)
