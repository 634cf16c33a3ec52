"""The MLflow model registry's versions: one registered version per trained adapter, logged as a
pyfunc inside the run that holds its evidence (runs: ml/tracking.py; aliases: ml/champion.py).

Order matters for "nothing half-written": the run gets params, metrics and artifacts first, the
model version is registered last, and only ml/champion.py moves an alias. A retried task finds the
version its first attempt registered (same run key and same adapter content) instead of
registering a second one. Each function works on a connected client (ml.tracking.connect).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.models import Model

from ml.config import PipelineConfig, RegistryConfig, resolve_path
from ml.errors import RegistryConflict, RegistryUnavailable
from ml.promotion import Decision
from ml.prompt import PromptFormat
from ml.signature import signature
from ml.tracking import ADAPTER_TAG, RUN_KEY_TAG, runs_of

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
    reg = cfg.registry
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
