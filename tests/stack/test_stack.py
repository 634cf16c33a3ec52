"""The production stack booted for real (`make test-stack`): docker-compose.yaml on a Docker engine.

Stand-in base images (tests/stack/images.py) under the official names, the project's Dockerfiles
built as they are, then `docker compose up --wait` with every service but the GPU worker
(tests/stack/compose.test.yaml puts an S3 stand-in in MinIO's place and a CPU worker on the train
queue). A client logs in to Airflow's REST API as the admin of the env file, triggers retrain_lora
with the demo profile and parameters, and follows it to success; MLflow, with auth, then holds
the version, its alias and its artifacts in the S3 store, and refuses anonymous writes. After
`down` and `up` the metadata, the registry and the artifacts are still there. Containers, networks,
volumes and the project's images are removed at the end; the stand-ins and the build cache stay.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import subprocess
import time
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import http_json
from images import ROOT, build_standins, untag_official

if not os.environ.get("STACK_TEST"):
    pytest.skip("boots the Docker stack: make test-stack", allow_module_level=True)

pytestmark = [pytest.mark.slow, pytest.mark.stack]
PROJECT = "lora-retrain-stacktest"
OVERRIDE = ROOT / "tests" / "stack" / "compose.test.yaml"
PROJECT_IMAGES = ("lora-retrain/airflow:latest", "lora-retrain/mlflow:latest", "lora-retrain/airflow-gpu:latest")
MODEL = "demo-pubmedqa-ko-tiny-lora"  # the demo profile's registered model
PHASES: dict[str, float] = {}
# Compose lets the caller's environment override the env file: the test session's own settings
# (tests/conftest.py sets RETRAIN_PROFILE and more) must not reach the stack.
CLEAN_ENV = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "DOCKER_HOST", "DOCKER_CONFIG")}


class Stack:
    def __init__(self, env_file: Path, env: dict[str, str]) -> None:
        self.env_file, self.env = env_file, env

    def compose(self, *args: str, check: bool = True, timeout: float = 1800,
                profile: str | None = None) -> subprocess.CompletedProcess[str]:
        cmd = ["docker", "compose", "--project-name", PROJECT, "--project-directory", str(ROOT),
               "--env-file", str(self.env_file), "-f", str(ROOT / "docker-compose.yaml"), "-f", str(OVERRIDE)]
        cmd += ["--profile", profile] if profile else []
        out = subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=timeout, env=CLEAN_ENV)
        if check and out.returncode != 0:
            raise AssertionError(f"docker compose {' '.join(args)} failed ({out.returncode}):\n"
                                 f"{out.stdout[-4000:]}\n{out.stderr[-6000:]}\n{self.diagnose()}")
        return out

    def ip(self, service: str) -> str:
        (cid,) = self.compose("ps", "-q", service).stdout.split()
        return subprocess.run(["docker", "inspect", "-f", "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
                               cid], capture_output=True, text=True, check=True).stdout.strip()

    def logs(self, service: str, tail: int = 80) -> str:
        out = self.compose("logs", "--no-color", "--tail", str(tail), service, check=False)
        return f"--- {service} (log) ---\n{out.stdout[-6000:]}{out.stderr[-2000:]}"

    def diagnose(self) -> str:
        """The containers that are not up and healthy (else all of them), each with its log's tail."""
        ps = subprocess.run(["docker", "ps", "-a", "--filter", f"label=com.docker.compose.project={PROJECT}",
                             "--format", "{{.Names}}\t{{.Status}}"], capture_output=True, text=True)
        rows = [line.split("\t") for line in ps.stdout.splitlines() if "\t" in line]
        bad = [r for r in rows if "unhealthy" in r[1] or "starting" in r[1]
               or (r[1].startswith("Exited") and not r[1].startswith("Exited (0)"))]
        out = ["containers: " + "; ".join(f"{name} {status}" for name, status in rows)]
        for name, status in bad or rows:
            logs = subprocess.run(["docker", "logs", "--tail", "60", name], capture_output=True, text=True)
            out.append(f"--- {name} ({status}) ---\n{logs.stdout[-3000:]}{logs.stderr[-3000:]}")
        return "\n".join(out)


def _wait(what: str, check: Callable[[], Any], timeout: float, stack: Stack) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(3)
    raise AssertionError(f"timed out waiting for {what}\n{stack.diagnose()}")


def _failed_task_logs(run_url: str, auth: dict[str, str]) -> str:
    """What the Airflow UI shows of each failed task: its log's last events."""
    code, tis = http_json("GET", f"{run_url}/taskInstances", headers=auth)
    out = []
    for ti in tis.get("task_instances", []) if code == 200 else []:
        if ti["state"] in ("failed", "upstream_failed") and ti["try_number"]:
            code, log = http_json("GET", f"{run_url}/taskInstances/{ti['task_id']}/logs/{ti['try_number']}"
                                  "?full_content=true", headers={**auth, "Accept": "application/json"})
            events = log.get("content", []) if code == 200 and isinstance(log, dict) else [log]
            lines = [e.get("event", "") + (f"\n{e['error_detail']}" if e.get("error_detail") else "")
                     if isinstance(e, dict) else str(e) for e in events]
            out.append(f"--- task {ti['task_id']} ({ti['state']}) ---\n" + "\n".join(lines[-40:]))
    return "\n".join(out) or f"no failed task found: {tis}"


class phase:  # noqa: N801 - a timer used as `with phase("up"):`
    def __init__(self, name: str) -> None:
        self.name = name

    def __enter__(self) -> None:
        self.start = time.monotonic()
        print(f"[stack] {self.name} ...", flush=True)

    def __exit__(self, *exc: object) -> None:
        PHASES[self.name] = round(time.monotonic() - self.start, 1)
        print(f"[stack] {self.name}: {PHASES[self.name]} s", flush=True)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    from cryptography.fernet import Fernet

    tmp = tmp_path_factory.mktemp("stack")
    env = {
        "AIRFLOW_UID": "50000", "POSTGRES_PASSWORD": secrets.token_urlsafe(16),
        "AIRFLOW__CORE__FERNET_KEY": Fernet.generate_key().decode(),
        "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_urlsafe(32),
        "AIRFLOW__API__SECRET_KEY": secrets.token_urlsafe(32),
        "_AIRFLOW_WWW_USER_USERNAME": "admin", "_AIRFLOW_WWW_USER_PASSWORD": secrets.token_urlsafe(16),
        "MINIO_ROOT_USER": "store" + secrets.token_hex(8), "MINIO_ROOT_PASSWORD": secrets.token_urlsafe(24),
        "MLFLOW_ADMIN_USERNAME": "admin", "MLFLOW_ADMIN_PASSWORD": secrets.token_urlsafe(16),
        "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_urlsafe(32),
        "MLFLOW_PIPELINE_USERNAME": "pipeline", "MLFLOW_PIPELINE_PASSWORD": secrets.token_urlsafe(16),
        "RETRAIN_PROFILE": "demo", "MLFLOW_UI_URL": "http://localhost:5000",
    }
    env_file = tmp / ".env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in env.items()))
    s = Stack(env_file, env)
    try:
        with phase("base images"):  # from the layer cache where the engine kept the last run's
            build_standins()
        try:
            with phase("project images"):
                # torch's CPU build comes from the stand-in's wheel folder, not PyTorch's index
                s.compose("build", "--build-arg", "TORCH_INDEX_URL=https://pypi.org/simple")
            with phase("up"):
                s.compose("up", "--wait", "--wait-timeout", "600", "--pull", "never")
            yield s
        finally:
            untag_official()
    finally:
        s.compose("down", "--volumes", "--remove-orphans", check=False)
        subprocess.run(["docker", "rmi", *PROJECT_IMAGES], capture_output=True)
        # compose builds the Airflow image once per service: the untagged copies go too
        subprocess.run(["docker", "image", "prune", "--force",
                        "--filter", f"label=com.docker.compose.project={PROJECT}"], capture_output=True)
        print(f"[stack] phases (s): {json.dumps(PHASES)}", flush=True)


def test_the_stack_runs_the_pipeline_and_keeps_its_state(stack: Stack) -> None:
    airflow, mlflow = f"http://{stack.ip('airflow-apiserver')}:8080", f"http://{stack.ip('mlflow')}:5000"
    env = stack.env

    def ml(method: str, path: str, body: Any = None, headers: dict[str, str] | None = None) -> tuple[int, Any]:
        """MLflow at its container's address, called by the name the services use (its Host check)."""
        return http_json(method, f"{mlflow}{path}", body, {"Host": "mlflow:5000", **(headers or {})})

    # Airflow: the admin of the env file logs in through the API (FAB auth manager)
    airflow_admin = {"username": env["_AIRFLOW_WWW_USER_USERNAME"], "password": env["_AIRFLOW_WWW_USER_PASSWORD"]}
    code, token = http_json("POST", f"{airflow}/auth/token", airflow_admin)
    assert code in (200, 201), token
    auth = {"Authorization": f"Bearer {token['access_token']}"}
    code, _ = http_json("POST", f"{airflow}/auth/token", {"username": "admin", "password": "wrong"})
    assert code in (400, 401, 403), code

    # MLflow: anonymous writes refused; the services' Host header accepted, a foreign one refused
    code, _ = ml("POST", "/api/2.0/mlflow/experiments/create", {"name": "anonymous"})
    assert code == 401, code
    admin = {"Authorization": "Basic " + base64.b64encode(
        f"{env['MLFLOW_ADMIN_USERNAME']}:{env['MLFLOW_ADMIN_PASSWORD']}".encode()).decode()}
    pipeline = {"Authorization": "Basic " + base64.b64encode(
        f"{env['MLFLOW_PIPELINE_USERNAME']}:{env['MLFLOW_PIPELINE_PASSWORD']}".encode()).decode()}
    assert ml("GET", "/api/2.0/mlflow/experiments/search?max_results=5", headers=admin)[0] == 200
    assert ml("GET", "/api/2.0/mlflow/experiments/search?max_results=5",
              headers={**admin, "Host": "attacker.example"})[0] == 403
    # the pipeline's account sees nothing it did not create
    code, private = ml("POST", "/api/2.0/mlflow/experiments/create", {"name": "people-only"}, admin)
    assert code == 200, private
    code, _ = ml("GET", f"/api/2.0/mlflow/experiments/get?experiment_id={private['experiment_id']}",
                    headers=pipeline)
    assert code == 403, code

    # airflow-init fails when its migration does (a wrong database password here), and says so
    broken = stack.compose("run", "--rm", "--no-deps", "-e", "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN="
                           "postgresql+psycopg2://airflow:wrong-password@postgres/airflow", "airflow-init", check=False)
    assert broken.returncode != 0 and "password authentication failed" in broken.stdout + broken.stderr, \
        (broken.returncode, broken.stdout[-2000:], broken.stderr[-2000:])

    # the demo's tiny base model, built on the shared volume as `make demo` builds it
    stack.compose("exec", "-T", "airflow-worker", "python", "-m", "ml", "tiny-model", "--profile", "demo")

    with phase("run"):
        _wait("the DAG to be parsed",
              lambda: http_json("GET", f"{airflow}/api/v2/dags/retrain_lora", headers=auth)[0] == 200, 300, stack)
        code, body = http_json("PATCH", f"{airflow}/api/v2/dags/retrain_lora", {"is_paused": False}, auth)
        assert code == 200, body
        # a person's approval asked for this run (the form's field), answered through the REST API
        code, run = http_json("POST", f"{airflow}/api/v2/dags/retrain_lora/dagRuns",
                              {"logical_date": None, "conf": {"profile": "demo", "max_steps": 30,
                                                              "approval": "required"}}, auth)
        assert code in (200, 201), run
        run_url = f"{airflow}/api/v2/dags/retrain_lora/dagRuns/{run['dag_run_id']}"

        def finished() -> str | None:
            code, state = http_json("GET", run_url, headers=auth)
            return state["state"] if code == 200 and state["state"] in ("success", "failed") else None

        def asking() -> bool:
            code, ti = http_json("GET", f"{run_url}/taskInstances/promote_or_keep", headers=auth)
            assert finished() is None, _failed_task_logs(run_url, auth)
            return code == 200 and ti["state"] == "awaiting_input"

        _wait("the approval request", asking, 1500, stack)
        time.sleep(6)  # a person answers after seconds (tests/test_approval.py says why that matters)
        code, body = http_json("PATCH", f"{run_url}/taskInstances/promote_or_keep/-1/hitlDetails",
                               {"chosen_options": ["Promote"], "params_input": {"comment": "stack test"}}, auth)
        assert code == 200, body
        state = _wait("the DAG run", finished, 900, stack)
        assert state == "success", _failed_task_logs(run_url, auth) + "\n" + stack.logs("mlflow")

    code, tis = http_json("GET", f"{run_url}/taskInstances", headers=auth)
    assert code == 200, tis
    by_task = {ti["task_id"]: ti for ti in tis["task_instances"]}
    train_host = stack.compose("exec", "-T", "airflow-worker-train", "hostname").stdout.strip()
    for task in ("train", "evaluate"):
        assert by_task[task]["queue"] == "gpu" and by_task[task]["hostname"] == train_host, by_task[task]
    assert by_task["validate"]["hostname"] != train_host

    def registry() -> tuple[dict[str, str], dict[str, Any]]:
        code, model = ml("GET", f"/api/2.0/mlflow/registered-models/get?name={MODEL}", headers=admin)
        assert code == 200, model
        aliases = {a["alias"]: a["version"] for a in model["registered_model"].get("aliases", [])}
        code, version = ml("GET", f"/api/2.0/mlflow/model-versions/get?name={MODEL}&version=1",
                              headers=admin)
        assert code == 200, version
        return aliases, version["model_version"]

    aliases, version = registry()
    assert aliases == {"champion": "1"}, aliases
    review = {t["key"]: t["value"] for t in version["tags"]}["review"]
    assert review.startswith("approved by ") and review.endswith(": stack test") and " None " not in review
    code, mlrun = ml("GET", f"/api/2.0/mlflow/runs/get?run_id={version['run_id']}", headers=admin)
    assert code == 200, mlrun
    params = {p["key"]: p["value"] for p in mlrun["run"]["data"]["params"]}
    assert params["train.max_steps"] == "30", params  # the trigger's parameter reached the trainer
    assert mlrun["run"]["info"]["user_id"] == env["MLFLOW_PIPELINE_USERNAME"]

    # the artifacts lie in the S3 store: listed through its S3 API, read back through MLflow
    listing = stack.compose("exec", "-T", "-e", "RCLONE_S3_PROVIDER=Other", "-e", "RCLONE_S3_ENDPOINT=http://minio:9000",
                            "-e", f"RCLONE_S3_ACCESS_KEY_ID={env['MINIO_ROOT_USER']}",
                            "-e", f"RCLONE_S3_SECRET_ACCESS_KEY={env['MINIO_ROOT_PASSWORD']}",
                            "minio", "rclone", "lsf", "-R", ":s3:mlflow").stdout.split()
    # the version's logged model (models:/m-...) holds the adapter, under the experiment's folder
    owner = version.get("model_id") or version["source"].removeprefix("models:/")
    adapter = [p for p in listing if owner in p and p.endswith("adapter_config.json")]
    assert adapter, (owner, [p for p in listing if "adapter" in p][:20] or listing[:20])
    code, artifacts = ml("GET", f"/api/2.0/mlflow/artifacts/list?run_id={version['run_id']}", headers=admin)
    assert code == 200 and artifacts.get("files"), artifacts

    def read_adapter_config() -> dict[str, Any]:
        path = urllib.parse.quote(adapter[0])
        code, config = ml("GET", f"/api/2.0/mlflow-artifacts/artifacts/{path}", headers=admin)
        assert code == 200, config
        return config if isinstance(config, dict) else json.loads(config)

    adapter_config = read_adapter_config()
    assert adapter_config["r"] == 16, adapter_config

    with phase("down/up"):
        stack.compose("down")
        stack.compose("up", "--wait", "--wait-timeout", "600", "--pull", "never")
    airflow, mlflow = f"http://{stack.ip('airflow-apiserver')}:8080", f"http://{stack.ip('mlflow')}:5000"
    run_url = f"{airflow}/api/v2/dags/retrain_lora/dagRuns/{run['dag_run_id']}"
    code, token = http_json("POST", f"{airflow}/auth/token", airflow_admin)
    assert code in (200, 201), token
    code, again = http_json("GET", run_url, headers={"Authorization": f"Bearer {token['access_token']}"})
    assert code == 200 and again["state"] == "success", again  # Airflow's metadata
    assert registry() == (aliases, version)  # MLflow's registry
    assert read_adapter_config() == adapter_config  # the artifacts in the S3 store


def test_the_gpu_worker_resolves_and_its_image_builds(stack: Stack) -> None:
    config = json.loads(stack.compose("config", "--format", "json", profile="gpu").stdout)
    gpu = config["services"]["airflow-worker-gpu"]
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and gpu["command"][-3:] == ["gpu", "--concurrency", "1"]
    assert device["count"] == -1  # `count: all`, as Compose resolves it
    assert "airflow-worker-gpu" not in stack.compose("config", "--services").stdout.split()
    with phase("gpu image"):
        stack.compose("build", "airflow-worker-gpu", profile="gpu")
    out = subprocess.run(["docker", "run", "--rm", "--entrypoint", "python", "lora-retrain/airflow-gpu:latest", "-c",
                          "import importlib.metadata as m; print(m.version('unsloth'), m.version('torch'))"],
                         capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.split()[0] == "2026.10.7", out.stdout + out.stderr[-2000:]
