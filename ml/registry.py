"""The MLflow model registry's versions: one registered version per trained adapter, logged as a
pyfunc inside the run that holds its evidence (runs: ml/tracking.py; aliases: ml/champion.py).

Order matters for "nothing half-written": the run gets params, metrics and artifacts first, the
model version is registered last, and only ml/champion.py moves an alias. A retried task finds the
version its first attempt registered (same run key and same adapter content) instead of
registering a second one. Each function works on a connected client (ml.tracking.connect).
"""

from __future__ import annotations

import contextlib
import getpass
import json
import logging
import shutil
import tempfile
from dataclasses import dataclass
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
from ml.errors import RegistryConflict, RegistryUnavailable
from ml.promotion import Decision
from ml.prompt import PromptFormat
from ml.review_card import with_export
from ml.signature import signature
from ml.tracking import ADAPTER_TAG, RUN_KEY_TAG, TEST_SPLIT_ARTIFACT, runs_of

log = logging.getLogger(__name__)

# A version's tags, few (MLflow's UI lists them alphabetically, below the review card): the decision
# and its numbers, and what the pipeline compares or finds a version by (the data, the config, the
# adapter, the base, the run key, the Airflow run). Its run has all the rest.
VERSION_TAGS = ("decision", "review", "challenger_loss", "baseline_loss", "baseline", "improvement_interval",
                "data_fingerprint", "config_sha256", ADAPTER_TAG, "base_model", "base_identity", RUN_KEY_TAG,
                "airflow.run_id")

# What loading and running the registered model imports (ml/serving.py and the ml modules it uses);
# bitsandbytes loads the base in 4-bit on CUDA.
SERVING_PACKAGES = ("mlflow", "torch", "transformers", "peft", "accelerate", "bitsandbytes", "safetensors",
                    "tokenizers", "huggingface-hub", "datasets", "pydantic", "pyyaml", "pandas", "numpy")


@dataclass(frozen=True)
class Registered:
    run_id: str
    version: str
    model_uri: str


def visible(client: MlflowClient, name: str) -> bool:
    """Whether this account can see the registered model (searches list only readable ones)."""
    return bool(client.search_registered_models(filter_string=f"name = '{name}'", max_results=1))


def find_registered(client: MlflowClient, reg: RegistryConfig, run_key: str, adapter: str) -> Registered | None:
    """The version an earlier attempt of this pipeline run registered for this very adapter, if any
    (another attempt's adapter under the same key is another version)."""
    for run_id in runs_of(client, reg, run_key):
        try:
            versions = client.search_model_versions(f"name='{reg.model_name}' and run_id='{run_id}'")
        except MlflowException:
            continue
        for v in versions:
            if v.tags.get(ADAPTER_TAG) == adapter:
                return Registered(run_id, str(v.version), f"models:/{reg.model_name}/{v.version}")
    return None


def publish(client: MlflowClient, cfg: PipelineConfig, adapter_dir: Path, run_id: str, tags: dict[str, str],
            test_metrics: dict[str, float], test_dataset: Any) -> Registered:
    """Log the adapter as the run's model (the active run, `run_id`) and register it as a new version
    carrying `VERSION_TAGS` of `tags`; the model records its test metrics on the test split it names."""
    with tempfile.TemporaryDirectory() as tmp:
        artifacts = {"adapter": str(standard_adapter(adapter_dir, cfg.model.revision, Path(tmp)))}
        return _publish(client, cfg, artifacts, run_id, tags, test_metrics, test_dataset)


def standard_adapter(adapter_dir: Path, revision: str | None, tmp: Path) -> Path:
    """The adapter as a standard PEFT folder that names its base: `base_model_name_or_path` (what the
    trainer loaded: the hub id, or the local folder) and `revision`, which the trainer leaves empty.
    Where the revision is missing, a copy in `tmp` records it (the weights, and the version's adapter
    hash tag, are the evaluated ones); `PeftModel.from_pretrained` and serving engines read both."""
    config_file = adapter_dir / "adapter_config.json"
    conf = json.loads(config_file.read_text(encoding="utf-8"))
    if conf.get("revision") == revision:
        return adapter_dir
    copy = tmp / adapter_dir.name
    shutil.copytree(adapter_dir, copy)
    (copy / config_file.name).write_text(json.dumps({**conf, "revision": revision}, indent=2), encoding="utf-8")
    return copy


def _publish(client: MlflowClient, cfg: PipelineConfig, artifacts: dict[str, str], run_id: str,
             tags: dict[str, str], test_metrics: dict[str, float], test_dataset: Any) -> Registered:
    reg = cfg.registry
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
        input_example=_input_example(test_dataset), pip_requirements=_pip_requirements())
    mlflow.log_metrics(test_metrics, model_id=info.model_id, dataset=test_dataset)
    # Registration comes last: a run that failed above leaves no version behind.
    mv = _create_version(client, reg.model_name, info, run_id, {k: v for k, v in tags.items() if k in VERSION_TAGS})
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
        if not visible(client, name):
            raise RegistryUnavailable(
                f"the registered model {name!r} exists but this MLflow account cannot read it: grant it "
                "MANAGE on the model (MLflow's admin), or set registry.model_name to a model it owns") from exc
    return client.create_model_version(name, info.model_uri, run_id=run_id, tags=tags, model_id=info.model_id)


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


def _pip_requirements() -> list[str]:
    reqs = []
    for pkg in SERVING_PACKAGES:
        try:
            reqs.append(f"{pkg}=={metadata.version(pkg)}".replace("+cpu", ""))
        except metadata.PackageNotFoundError:
            reqs.append(pkg)
    return reqs


def describe(client: MlflowClient, reg: RegistryConfig, version: str, card: str) -> None:
    """The version's description in MLflow: its review card (ml/review_card.py)."""
    client.update_model_version(reg.model_name, version, description=card)


def tag_numbers(client: MlflowClient, reg: RegistryConfig, version: str, decision: Decision) -> None:
    """The decision's numbers on the version: both losses, the comparator, the interval."""
    tags = {"challenger_loss": f"{decision.challenger_loss:.4f}", "baseline_loss": f"{decision.baseline_loss:.4f}",
            "baseline": decision.baseline}
    if decision.low is not None:
        tags["improvement_interval"] = (
            f"{decision.improvement:+.4f} [{decision.low:+.4f}, {decision.high:+.4f}] "
            f"({decision.confidence:.0%}, {decision.resamples} resamples, seed {decision.seed})")
    for key, value in tags.items():
        client.set_model_version_tag(reg.model_name, version, key, value)


def record_outcome(client: MlflowClient, reg: RegistryConfig, version: str, outcome: str, decision: Decision) -> None:
    """What became of the version (promoted, rejected, needs_review), with the decision's numbers."""
    tag_numbers(client, reg, version, decision)
    client.set_model_version_tag(reg.model_name, version, "decision", outcome)
    if decision.review is not None:  # who approved or rejected it, when, and why
        client.set_model_version_tag(reg.model_name, version, "review", str(decision.review))


def check_adapter(client: MlflowClient, reg: RegistryConfig, registered: Registered, adapter: str) -> None:
    """The version must hold the adapter that was evaluated (a re-run under the same key cannot swap it)."""
    mv = client.get_model_version(reg.model_name, registered.version)
    if mv.tags.get(ADAPTER_TAG) != adapter:
        raise RegistryConflict(f"version {registered.version} holds adapter {mv.tags.get(ADAPTER_TAG)}, not the "
                               f"evaluated {adapter}: it belongs to another attempt; nothing was promoted")


# ---------------------------------------------------------------- a version's files

@dataclass(frozen=True)
class Downloaded:
    """A registered version as downloaded: its model folder, adapter, the base model it carries (a small
    local one; else None, and `model_config` names it), the settings it was logged with, and its tags."""
    version: str
    run_id: str
    model_dir: Path
    adapter_dir: Path
    base_path: Path | None
    model_config: dict[str, Any]
    tags: dict[str, str]


def download_version(client: MlflowClient, reg: RegistryConfig, version: str, dst: Path) -> Downloaded:
    """Version `version`'s registered model, downloaded into `dst`."""
    mv = client.get_model_version(reg.model_name, version)
    model_dir = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{reg.model_name}/{mv.version}",
                                                         dst_path=str(dst)))
    flavor = yaml.safe_load((model_dir / "MLmodel").read_text())["flavors"]["python_function"]
    # MLflow writes `Model.log(model_config=...)` under the key `config`
    artifacts, model_config = flavor["artifacts"], flavor.get("config") or flavor.get("model_config") or {}
    embedded = artifacts.get("base_model")
    return Downloaded(str(mv.version), str(mv.run_id), model_dir, model_dir / artifacts["adapter"]["path"],
                      model_dir / embedded["path"] if embedded else None, model_config, dict(mv.tags))


def test_split(client: MlflowClient, run_id: str, dst: Path) -> Path | None:
    """The test rows a version's run was evaluated on (`TEST_SPLIT_ARTIFACT`), downloaded into `dst`;
    None for a run registered before they were logged."""
    try:
        return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=TEST_SPLIT_ARTIFACT,
                                                        dst_path=str(dst)))
    except (MlflowException, OSError):
        return None


# ---------------------------------------------------------------- exports (ml/export.py makes them)

EXPORT_ARTIFACT = "merged_model"  # in a version's run: its merged 16-bit model, once checked
EXPORT_TAG = "export"  # on the version: the export's URI (runs:/<run id>/merged_model)
PRUNED_TAG = "export_pruned"  # on the version: when and by whom its export was deleted


def recorded_export(client: MlflowClient, reg: RegistryConfig, version: str) -> str | None:
    """The URI of the version's checked export, while its files are there; else None."""
    mv = client.get_model_version(reg.model_name, version)
    uri = mv.tags.get(EXPORT_TAG)
    return uri if uri and client.list_artifacts(mv.run_id, EXPORT_ARTIFACT) else None


def record_export(client: MlflowClient, reg: RegistryConfig, version: str, folder: Path,
                  tags: dict[str, str]) -> str:
    """Store a checked export (`folder`) beside the version, in its run's artifacts, then tag the
    version with it and its check's numbers and add it to the review card. The tags come last: an
    upload that fails leaves no tag, and the files it left are replaced by the next attempt or pruned."""
    mv = client.get_model_version(reg.model_name, version)
    _delete_artifacts(client, mv.run_id, EXPORT_ARTIFACT)  # what an interrupted attempt left
    client.log_artifacts(mv.run_id, str(folder), EXPORT_ARTIFACT)
    uri = f"runs:/{mv.run_id}/{EXPORT_ARTIFACT}"
    for key, value in {**tags, EXPORT_TAG: uri}.items():
        client.set_model_version_tag(reg.model_name, version, key, value)
    with contextlib.suppress(MlflowException):
        client.delete_model_version_tag(reg.model_name, version, PRUNED_TAG)
    _describe_export(client, reg, version)
    log.info("version %s of %s: export stored at %s", version, reg.model_name, uri)
    return uri


def _describe_export(client: MlflowClient, reg: RegistryConfig, version: str) -> None:
    mv = client.get_model_version(reg.model_name, version)
    describe(client, reg, version, with_export(mv.description or "", mv.tags))


def _delete_artifacts(client: MlflowClient, run_id: str, path: str) -> None:
    """A run's artifacts under `path`, deleted in its artifact store (a local folder, S3, or the
    server's proxy: `mlflow server` answers DELETE). MLflow's client has no call for it."""
    from mlflow.tracking.artifact_utils import get_artifact_repository

    if client.list_artifacts(run_id, path):
        get_artifact_repository(client.get_run(run_id).info.artifact_uri).delete_artifacts(path)


def prune_exports(client: MlflowClient, reg: RegistryConfig, delete: bool) -> list[dict[str, str]]:
    """The exports of versions that hold no alias (neither @champion nor @previous_champion nor any
    other), with what they hold; `delete`: deleted too, each version tagged when and by whom. Files an
    interrupted export left (no tag) count as an export."""
    found = []
    for mv in client.search_model_versions(f"name='{reg.model_name}'"):
        if client.get_model_version(reg.model_name, mv.version).aliases:
            continue
        files = client.list_artifacts(mv.run_id, EXPORT_ARTIFACT)
        if not files and EXPORT_TAG not in mv.tags:
            continue
        item = {"version": str(mv.version), "export": mv.tags.get(EXPORT_TAG, f"runs:/{mv.run_id}/{EXPORT_ARTIFACT}"
                                                                  " (not recorded: an interrupted export)"),
                "files": str(len(files))}
        if delete:
            _delete_artifacts(client, mv.run_id, EXPORT_ARTIFACT)
            with contextlib.suppress(MlflowException):
                client.delete_model_version_tag(reg.model_name, str(mv.version), EXPORT_TAG)
            when = datetime.now(UTC).isoformat(timespec="seconds")
            client.set_model_version_tag(reg.model_name, str(mv.version), PRUNED_TAG, f"{when} by {getpass.getuser()}")
            _describe_export(client, reg, str(mv.version))
            log.info("deleted the export of version %s of %s", mv.version, reg.model_name)
        found.append(item)
    return sorted(found, key=lambda item: int(item["version"]))
