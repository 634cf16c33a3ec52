"""Static checks of docker-compose.yaml; tests/stack/test_stack.py boots it (make test-stack)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import ROOT

from ml.config import load_config

COMPOSE = ROOT / "docker-compose.yaml"
SECRETS = {"POSTGRES_PASSWORD", "AIRFLOW__CORE__FERNET_KEY", "AIRFLOW__API_AUTH__JWT_SECRET",
           "AIRFLOW__API__SECRET_KEY", "_AIRFLOW_WWW_USER_PASSWORD", "MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD",
           "MLFLOW_ADMIN_USERNAME", "MLFLOW_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY",
           "MLFLOW_PIPELINE_USERNAME", "MLFLOW_PIPELINE_PASSWORD"}
INIT_JOBS = {"airflow-init", "minio-init", "mlflow-init"}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())  # type: ignore[no-any-return]


def test_validates_against_the_compose_specification(compose: dict[str, Any]) -> None:
    import jsonschema

    schema = json.loads((ROOT / "tests" / "fixtures" / "compose-spec.json").read_text())
    errors = sorted(jsonschema.Draft201909Validator(schema).iter_errors(compose), key=str)
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors[:10])


def test_every_dependency_exists_and_waits_on_a_condition(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name, svc in services.items():
        for dep, how in svc.get("depends_on", {}).items():
            assert dep in services, f"{name} depends on unknown service {dep}"
            expected = "service_completed_successfully" if dep in INIT_JOBS else "service_healthy"
            assert how["condition"] == expected, f"{name} -> {dep}: {how}"
        if name not in INIT_JOBS:
            assert "healthcheck" in svc, f"{name} has no healthcheck"


def test_the_topology(compose: dict[str, Any]) -> None:
    assert {"postgres", "redis", "minio", "minio-init", "mlflow", "mlflow-init", "airflow-init", "airflow-apiserver",
            "airflow-scheduler", "airflow-dag-processor", "airflow-triggerer", "airflow-worker",
            "airflow-worker-gpu"} <= set(compose["services"])
    assert compose["services"]["mlflow"]["build"]["context"] == "./mlflow"
    assert (ROOT / "mlflow" / "Dockerfile").exists() and (ROOT / "Dockerfile.gpu").exists()


def test_gpu_worker_serves_the_train_queue_with_the_hosts_gpus(compose: dict[str, Any]) -> None:
    gpu = compose["services"]["airflow-worker-gpu"]
    queue = load_config().deploy.gpu_queue
    assert f"--queues {queue}" in gpu["command"]
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert device["count"] == "all"  # the trainer's processes, one per GPU, take every GPU of the host
    assert gpu["shm_size"] == "1gb"  # NCCL between them, through /dev/shm (64 MiB by default)
    assert gpu["build"]["dockerfile"] == "Dockerfile.gpu"
    assert gpu["profiles"] == ["gpu"]  # `docker compose up` on a host without a GPU leaves it out
    assert f"--queues {queue}" not in compose["services"]["airflow-worker"]["command"]


def test_workers_reach_mlflow_through_the_service_by_env(compose: dict[str, Any]) -> None:
    mlflow = compose["services"]["mlflow"]
    port = next(a.split("=")[1] for a in mlflow["command"] if a.startswith("--port="))
    assert "--app-name=basic-auth" in mlflow["command"]  # authentication on
    assert any(a.startswith("--artifacts-destination=s3://") for a in mlflow["command"])  # proxied artifacts
    for name in ("airflow-worker", "airflow-worker-gpu", "airflow-scheduler"):
        env = compose["services"][name]["environment"]
        assert env["MLFLOW_TRACKING_URI"] == f"http://mlflow:{port}"
        # the pipeline's own account, not the admin's (mlflow-init creates it)
        assert env["MLFLOW_TRACKING_USERNAME"].startswith("${MLFLOW_PIPELINE_USERNAME:?")
        assert env["MLFLOW_TRACKING_PASSWORD"].startswith("${MLFLOW_PIPELINE_PASSWORD:?")
    # MLflow's allowed-hosts check must accept the name the services call it by
    hosts = next(a for a in mlflow["command"] if a.startswith("--allowed-hosts="))
    assert f"mlflow:{port}" in hosts.partition("=")[2].split(",")
    for code in [*(ROOT / "ml").rglob("*.py"), *(ROOT / "dags").rglob("*.py")]:  # no URL hard-coded
        assert "mlflow:5000" not in code.read_text() and "127.0.0.1:5000" not in code.read_text(), code


def test_every_secret_comes_from_the_environment_without_a_default() -> None:
    text = COMPOSE.read_text()
    for var in SECRETS:
        uses = re.findall(r"(?<!\$)\$\{" + re.escape(var) + r"(:?[?-])?[^}]*\}", text)
        assert uses, f"{var} is not used"
        assert all(u in (":?", "?") for u in uses), f"{var} has a default or is optional"
    example = (ROOT / ".env.example").read_text()
    for var in SECRETS:
        assert re.search(rf"^{re.escape(var)}=", example, re.M), f"{var} missing from .env.example"
    assert ".env" in (ROOT / ".gitignore").read_text().split()


def test_no_secret_is_written_in_the_repository() -> None:
    example = (ROOT / ".env.example").read_text()
    for var in SECRETS - {"MLFLOW_ADMIN_USERNAME", "MLFLOW_PIPELINE_USERNAME", "MINIO_ROOT_USER"}:
        assert re.search(rf"^{re.escape(var)}=$", example, re.M), f"{var} has a value in .env.example"


@pytest.mark.parametrize("path", [Path("mlflow/entrypoint.sh")])
def test_mlflow_auth_config_is_built_from_env(path: Path) -> None:
    script = (ROOT / path).read_text()
    assert "admin_password = ${MLFLOW_ADMIN_PASSWORD}" in script
    assert "default_permission = NO_PERMISSIONS" in script


def test_nothing_with_root_credentials_listens_beyond_loopback(compose: dict[str, Any]) -> None:
    for port in compose["services"]["minio"].get("ports", []):
        assert str(port).startswith("127.0.0.1:"), port


def test_a_failed_migration_fails_airflow_init(compose: dict[str, Any]) -> None:
    script = "\n".join(compose["services"]["airflow-init"]["command"])
    assert "set -euo pipefail" in script and "|| true" not in script
    assert script.index("airflow db migrate") < script.index("airflow users create")
