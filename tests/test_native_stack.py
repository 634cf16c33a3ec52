"""The compose topology, run natively: real processes on loopback, Postgres and Redis of the machine.

MLflow server (basic auth, Postgres backend) + Airflow api-server, scheduler,
dag-processor and a Celery worker on both queues (CeleryExecutor, Redis broker,
Postgres metadata). A client triggers the DAG through Airflow's REST API (v2,
token from /auth/token), polls it to success, and checks the registry through
MLflow's REST API with credentials; an anonymous MLflow write must be refused.
Everything started here is stopped, and the databases are dropped.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import free_port, http_json

pytestmark = [pytest.mark.slow, pytest.mark.integration]
PG = {"host": "127.0.0.1", "port": 5432, "user": "postgres"}
REDIS_DB = 11


def _reachable(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


if not (_reachable(5432) and _reachable(6379)):
    pytest.skip("needs Postgres on 127.0.0.1:5432 and Redis on 127.0.0.1:6379", allow_module_level=True)


def _wait(what: str, check: Any, timeout: float, procs: dict[str, subprocess.Popen[bytes]], logs: Path) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        dead = [n for n, p in procs.items() if p.poll() is not None]
        if dead:
            raise AssertionError(f"{dead} exited while waiting for {what}: "
                                 + (logs / f"{dead[0]}.log").read_text()[-3000:])
        time.sleep(2)
    tails = {n: (logs / f"{n}.log").read_text()[-1500:] for n in procs}
    raise AssertionError(f"timed out waiting for {what}: {json.dumps(tails, indent=1)}")


@pytest.fixture()
def databases() -> Iterator[dict[str, str]]:
    import psycopg2

    suffix = secrets.token_hex(4)
    names = {k: f"retrain_{k}_{suffix}" for k in ("airflow", "mlflow", "mlflow_auth")}
    conn = psycopg2.connect(dbname="postgres", **PG)
    conn.autocommit = True
    with conn.cursor() as cur:
        for name in names.values():
            cur.execute(f"CREATE DATABASE {name}")
    try:
        yield {k: f"postgresql+psycopg2://postgres@127.0.0.1:5432/{v}" for k, v in names.items()}
    finally:
        with conn.cursor() as cur:
            for name in names.values():
                cur.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        conn.close()
        import redis

        redis.Redis(host="127.0.0.1", port=6379, db=REDIS_DB).flushdb()


def test_trigger_through_rest_and_find_the_promoted_version(
        databases: dict[str, str], tiny_model: Path, tmp_path: Path) -> None:
    from cryptography.fernet import Fernet

    logs = tmp_path / "logs"
    logs.mkdir()
    ml_port, af_port = free_port(), free_port()
    ml_url, af_url = f"http://127.0.0.1:{ml_port}", f"http://127.0.0.1:{af_port}"
    admin_password = secrets.token_urlsafe(16)
    ini = tmp_path / "basic_auth.ini"
    ini.write_text(f"[mlflow]\ndefault_permission = NO_PERMISSIONS\ndatabase_uri = {databases['mlflow_auth']}\n"
                   f"admin_username = admin\nadmin_password = {admin_password}\n"
                   "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
    (tmp_path / "passwords.json").write_text(json.dumps({"tester": "tester-password"}))
    env = {**os.environ,
           "MLFLOW_AUTH_CONFIG_PATH": str(ini), "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16),
           "MLFLOW_TRACKING_URI": ml_url, "MLFLOW_TRACKING_USERNAME": "admin",
           "MLFLOW_TRACKING_PASSWORD": admin_password,
           "AIRFLOW_HOME": str(tmp_path / "airflow"),
           "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
           "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": databases["airflow"],
           "AIRFLOW__CELERY__BROKER_URL": f"redis://127.0.0.1:6379/{REDIS_DB}",
           "AIRFLOW__CELERY__RESULT_BACKEND": "db+" + databases["airflow"],
           "AIRFLOW__CELERY__WORKER_CONCURRENCY": "1",
           "AIRFLOW__CORE__FERNET_KEY": Fernet.generate_key().decode(),
           "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_hex(16),
           "AIRFLOW__API__SECRET_KEY": secrets.token_hex(16),
           "AIRFLOW__API__HOST": "127.0.0.1", "AIRFLOW__API__PORT": str(af_port),
           "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{af_url}/execution/",
           "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "tester:admin",
           "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(tmp_path / "passwords.json"),
           "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
           "RETRAIN_PROFILE": "e2e-manual",  # no schedule: the scheduler runs only what we trigger
           "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
           "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "2"}
    migrate = subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], env=env, capture_output=True,
                             text=True, timeout=300)
    assert migrate.returncode == 0, migrate.stdout[-2000:] + migrate.stderr[-3000:]
    pool = subprocess.run([sys.executable, "-m", "airflow", "pools", "set", "mlflow_registry", "1", "registry"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert pool.returncode == 0, pool.stderr[-2000:]
    commands = {
        "mlflow": [sys.executable, "-m", "mlflow", "server", "--app-name", "basic-auth", "--backend-store-uri",
                   databases["mlflow"], "--artifacts-destination", str(tmp_path / "artifacts"),
                   "--host", "127.0.0.1", "--port", str(ml_port), "--workers", "1"],
        "api-server": [sys.executable, "-m", "airflow", "api-server", "--port", str(af_port)],
        "scheduler": [sys.executable, "-m", "airflow", "scheduler"],
        "dag-processor": [sys.executable, "-m", "airflow", "dag-processor"],
        "worker": [sys.executable, "-m", "airflow", "celery", "worker", "--queues", "default,gpu",
                   "--concurrency", "1"],
    }
    procs: dict[str, subprocess.Popen[bytes]] = {}
    basic = {"Authorization": "Basic " + base64.b64encode(f"admin:{admin_password}".encode()).decode()}
    try:
        for name, cmd in commands.items():
            procs[name] = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=(logs / f"{name}.log").open("wb"),
                                           stderr=subprocess.STDOUT, start_new_session=True)
            if name == "mlflow":
                # Airflow's tasks use an account of their own, as in docker-compose.yaml: it owns
                # what it creates and reads nothing else (a model it has not created yet answers 403)
                _wait("mlflow", lambda: http_json("GET", f"{ml_url}/health")[0] == 200, 180, procs, logs)
                pipeline_password = secrets.token_urlsafe(16)
                status, body = http_json("POST", f"{ml_url}/api/2.0/mlflow/users/create",
                                         {"username": "pipeline", "password": pipeline_password}, basic)
                assert status == 200, body
                env = {**env, "MLFLOW_TRACKING_USERNAME": "pipeline", "MLFLOW_TRACKING_PASSWORD": pipeline_password}
        _wait("api-server", lambda: http_json("GET", f"{af_url}/api/v2/monitor/health")[0] == 200, 240, procs, logs)

        status, body = http_json("POST", f"{af_url}/auth/token", {"username": "tester", "password": "tester-password"})
        assert status in (200, 201), body
        auth = {"Authorization": f"Bearer {body['access_token']}"}
        _wait("the DAG to be parsed",
              lambda: http_json("GET", f"{af_url}/api/v2/dags/retrain_lora", headers=auth)[0] == 200, 240, procs, logs)
        http_json("PATCH", f"{af_url}/api/v2/dags/retrain_lora", {"is_paused": False}, auth)
        status, run = http_json("POST", f"{af_url}/api/v2/dags/retrain_lora/dagRuns",
                                {"logical_date": None, "conf": {"profile": "e2e-manual"}}, auth)
        assert status in (200, 201), run
        run_id = run["dag_run_id"]

        def finished(run_id: str) -> str | None:
            code, state = http_json("GET", f"{af_url}/api/v2/dags/retrain_lora/dagRuns/{run_id}", headers=auth)
            return state["state"] if code == 200 and state["state"] in ("success", "failed") else None

        assert _wait("the DAG run", lambda: finished(run_id), 900, procs, logs) == "success", \
            (logs / "worker.log").read_text()[-4000:]

        # the task logs, as the UI shows them: nothing at ERROR level in a run that succeeded
        # (progress bars, warnings and routine messages of the libraries are not errors)
        for task in ("load", "validate", "prepare", "train", "evaluate", "register", "promote_champion"):
            code, log = http_json("GET", f"{af_url}/api/v2/dags/retrain_lora/dagRuns/{run_id}/taskInstances/{task}"
                                  "/logs/1?full_content=true", headers={**auth, "Accept": "application/json"})
            assert code == 200, log
            events = [e for e in log["content"] if isinstance(e, dict)]
            errors = [e.get("event") for e in events if str(e.get("level", "")).lower() in ("error", "critical")]
            assert len(events) > 3 and not errors, (task, errors[:5])

        status, model = http_json("GET", f"{ml_url}/api/2.0/mlflow/registered-models/get?name=e2e-tiny-lora",
                                  headers=basic)
        assert status == 200, model
        aliases = {a["alias"]: a["version"] for a in model["registered_model"].get("aliases", [])}
        assert aliases == {"champion": "1"}
        status, found = http_json(
            "GET", f"{ml_url}/api/2.0/mlflow/model-versions/search?filter=name%3D%27e2e-tiny-lora%27", headers=basic)
        (version,) = found["model_versions"]
        tags = {t["key"]: t["value"] for t in version["tags"]}
        assert tags["decision"] == "promoted" and tags["baseline"] == "base model"
        assert tags["airflow.run_id"] == run_id
        status, mlrun = http_json("GET", f"{ml_url}/api/2.0/mlflow/runs/get?run_id={version['run_id']}", headers=basic)
        assert status == 200 and mlrun["run"]["info"]["user_id"] == "pipeline", mlrun

        status, _ = http_json("POST", f"{ml_url}/api/2.0/mlflow/experiments/create", {"name": "anonymous"})
        assert status == 401  # no anonymous writes

        # New data announced as an upstream job would, through the REST API: an asset event for the
        # profile's dataset queues a run. Its data and config equal the champion's: it skips.
        from ml.config import load_config

        uri = load_config("e2e-manual").data.uri
        status, found = http_json("GET", f"{af_url}/api/v2/assets?limit=100", headers=auth)
        (asset,) = [a for a in found["assets"] if a["uri"] == uri]
        status, event = http_json("POST", f"{af_url}/api/v2/assets/events", {"asset_id": asset["id"]}, auth)
        assert status in (200, 201), event

        def triggered() -> str | None:
            code, runs = http_json("GET", f"{af_url}/api/v2/dags/retrain_lora/dagRuns", headers=auth)
            ids = [r["dag_run_id"] for r in runs.get("dag_runs", []) if r["run_type"] == "asset_triggered"]
            return ids[0] if code == 200 and ids else None

        data_run = _wait("a run triggered by new data", triggered, 120, procs, logs)
        assert _wait("the data-triggered run", lambda: finished(data_run), 600, procs, logs) == "success"
        code, tis = http_json("GET", f"{af_url}/api/v2/dags/retrain_lora/dagRuns/{data_run}/taskInstances",
                              headers=auth)
        states = {t["task_id"]: t["state"] for t in tis["task_instances"]}
        assert states["preflight"] == "skipped" and states["train"] == "skipped", states
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
