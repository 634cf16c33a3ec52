"""The champion's alias against a real MLflow server."""

from __future__ import annotations

import pytest


@pytest.mark.slow
def test_champion_is_none_on_an_empty_registry(tracking: str, tmp_path: object) -> None:
    from pathlib import Path

    from ml import champion, tracking
    from ml.config import load_config

    cfg = load_config("e2e", {"registry.model_name": "never-registered"})
    assert champion.fetch(tracking.connect(cfg.registry), cfg.registry, Path(str(tmp_path))) is None


@pytest.mark.slow
def test_the_pipelines_experiment_says_it_is_classic_model_training(tracking: str) -> None:
    """Created by the pipeline, or made before and found: tagged custom_model_development (MLflow's kind
    for classic training); the view itself is chosen by the links (tests/test_plugin.py)."""
    from mlflow import MlflowClient

    from ml import tracking as runs
    from ml.config import load_config

    client = MlflowClient(tracking)
    new = load_config("e2e", {"registry.experiment": "kind-new"}).registry
    exp_id = runs.ensure_experiment(client, new)
    assert client.get_experiment(exp_id).tags["mlflow.experimentKind"] == "custom_model_development"
    old_id = client.create_experiment("kind-old", tags={"mlflow.experimentKind": "genai_development"})
    assert runs.ensure_experiment(client, load_config("e2e", {"registry.experiment": "kind-old"}).registry) == old_id
    assert client.get_experiment(old_id).tags["mlflow.experimentKind"] == "custom_model_development"


def test_run_names_say_profile_date_and_decision() -> None:
    from ml.tracking import run_title

    assert run_title("demo", "retrain_lora__scheduled__2026-12-06T00:00:00+00:00") == "demo 2026-12-06"
    assert run_title("demo", "retrain_lora__manual__2026-12-06T14:38:12.5+00:00", "needs_review") == \
        "demo 2026-12-06 14:38 · needs review"
    from datetime import UTC, datetime

    assert run_title("e2e", "my-run", "promoted") == f"e2e {datetime.now(UTC):%Y-%m-%d} · promoted"
