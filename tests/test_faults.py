"""Faults a run meets when nobody watches: MLflow down or hung, a worker killed in the middle of a
registry step. Real processes: an MLflow server, a socket that never answers, a process that dies."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, MlflowServer

from ml import pipeline
from ml.config import load_config
from ml.errors import RegistryUnavailable
from ml.pipeline.local import run_all
from ml.runs import RunPaths, read_json, run_paths

pytestmark = pytest.mark.slow


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture()
def silent_server() -> Iterator[str]:
    """A 'tracking server' that accepts connections and never answers."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    server.close()


def test_mlflow_down_when_a_run_starts_fails_before_any_training(tiny_model: Path, tmp_path: Path) -> None:
    uri = f"http://127.0.0.1:{_closed_port()}"
    cfg = load_config("e2e", {"output_dir": str(tmp_path), "registry.tracking_uri": uri,
                              "registry.request_retries": 0, "registry.request_timeout_s": 5})
    with pytest.raises(RegistryUnavailable, match=f"MLflow at {uri} cannot be used by this run"):
        run_all(cfg, "server-down")
    assert not (run_paths(cfg, "server-down").train).exists()


def test_a_hung_tracking_server_ends_the_step_within_its_timeout(silent_server: str, tmp_path: Path) -> None:
    cfg = load_config("e2e", {"output_dir": str(tmp_path), "registry.tracking_uri": silent_server,
                              "registry.request_retries": 0, "registry.request_timeout_s": 2})
    started = time.monotonic()
    with pytest.raises(RegistryUnavailable, match=silent_server):
        pipeline.preflight(cfg, run_paths(cfg, "hung"))
    assert time.monotonic() - started < 60  # MLflow's own defaults: 120 s per request, 7 retries


def _killed_in(step: str, owner: str, name: str, run_dir: Path, run_key: str, model: str) -> int:
    """Run `pipeline.<step>` (for registered model `model`) in a process that dies (os._exit: no
    cleanup, like SIGKILL) right after its first call of `<owner>.<name>` returns; its exit code."""
    code = (
        "import json, os, pathlib\n"
        "import mlflow, mlflow.models\n"
        "from ml import champion, pipeline\n"
        "from ml.runs import RunPaths\n"
        "from ml.config import PipelineConfig\n"
        f"original = getattr({owner}, {name!r})\n"
        "def dying(*args, **kwargs):\n"
        "    original(*args, **kwargs)\n"
        "    os._exit(9)\n"
        f"setattr({owner}, {name!r}, dying)\n"
        f"paths = RunPaths(pathlib.Path({str(run_dir)!r}))\n"
        "cfg = PipelineConfig.model_validate(json.loads((paths.root / 'config.json').read_text()))\n"
        f"cfg = cfg.model_copy(update={{'registry': cfg.registry.model_copy(update={{'model_name': {model!r}}})}})\n"
        f"pipeline.{step}(cfg, paths, {run_key!r})\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode in (0, 9), out.stderr[-3000:]
    return out.returncode


@pytest.fixture(scope="module")
def evaluated(module_tracking: str, evaluated_run: tuple[Any, Any], tmp_path_factory: pytest.TempPathFactory) -> Any:
    """(config, run folder) of one trained and evaluated run (no champion: promote over the base), a copy
    of the session's, frozen as the killed processes read it."""
    cfg, shared = evaluated_run
    paths = RunPaths(tmp_path_factory.mktemp("faults") / "evaluated")
    shutil.copytree(shared.root, paths.root)
    assert read_json(paths.evaluation)["decision"]["outcome"] == "promote"
    return cfg, paths


def _named(cfg: Any, model: str) -> Any:
    return cfg.model_copy(update={"registry": cfg.registry.model_copy(update={"model_name": model})})


# Every MLflow write of register, in order: the run opened, its artifacts, the model, the version.
REGISTER_WRITES = [("mlflow", "start_run"), ("mlflow", "log_artifact"), ("mlflow.models.Model", "log"),
                   ("mlflow.MlflowClient", "create_model_version")]


@pytest.mark.parametrize(("owner", "name"), REGISTER_WRITES)
def test_a_worker_killed_in_register_and_retried_leaves_one_finished_version(
        evaluated: Any, owner: str, name: str) -> None:
    from mlflow import MlflowClient

    cfg, paths = evaluated
    model, key = f"faults-{name}", f"killed-in-{name}"
    assert _killed_in("register", owner, name, paths.root, key, model) == 9
    client = MlflowClient()
    before = client.search_model_versions(f"name='{model}'") if name == "create_model_version" else []
    retried = pipeline.register(_named(cfg, model), paths, key)  # the task's retry
    (version,) = client.search_model_versions(f"name='{model}'")
    assert retried["version"] == str(version.version) and [v.version for v in before] in ([], [version.version])
    run = client.get_run(version.run_id)
    assert run.info.status == "FINISHED" and "challenger_loss" in version.tags
    assert {"reports/evaluation.json", "reports/train_rows.json", "reports/loss_curve.png"} <= {
        a.path for a in client.list_artifacts(version.run_id, "reports")}
    # what the killed attempt left open was closed, and only the retry's run looks alive
    exp = client.get_experiment_by_name(cfg.registry.experiment)
    others = [r for r in client.search_runs([exp.experiment_id], f"tags.`pipeline.run_key` = '{key}'")
              if r.info.run_id != version.run_id]
    assert all(r.info.status == "KILLED" for r in others), [(r.info.run_id, r.info.status) for r in others]
    assert len(others) == (0 if name == "create_model_version" else 1)


def test_a_worker_killed_after_the_alias_moved_and_retried_finishes_the_bookkeeping(evaluated: Any) -> None:
    from mlflow import MlflowClient

    cfg, paths = evaluated
    model, key = "faults-promote", "killed-in-promote"
    cfg = _named(cfg, model)
    (version,) = [pipeline.register(cfg, paths, key)["version"]]
    client = MlflowClient()
    assert _killed_in("promote", "champion", "move", paths.root, key, model) == 9
    assert client.get_registered_model(model).aliases == {"champion": version}
    assert client.get_model_version(model, version).tags["decision"] == "promote"  # not yet "promoted"
    result = pipeline.promote(cfg, paths, key)  # the retry finishes the bookkeeping, scores nothing again
    assert result["promoted"] and client.get_model_version(model, version).tags["decision"] == "promoted"
    assert client.get_registered_model(model).aliases == {"champion": version}
    assert len(client.search_model_versions(f"name='{model}'")) == 1


def test_mlflow_down_during_register_and_promote_the_retries_end_with_one_version_and_the_alias(
        evaluated: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A server of its own, stopped in the middle of register (after the run was opened) and before
    promote, started again on the same port and store: each step's retry completes the run."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from ml import registry

    server = MlflowServer(tmp_path / "mlflow")
    server.start()
    cfg, paths = evaluated
    cfg = cfg.model_copy(update={"registry": cfg.registry.model_copy(update={
        "tracking_uri": server.url, "request_retries": 0, "request_timeout_s": 5, "model_name": "faults-outage"})})
    key = "outage"
    original = mlflow.log_artifact

    def outage(*args: Any, **kwargs: Any) -> Any:  # the server goes away while the run is being written
        server.stop()
        return original(*args, **kwargs)

    monkeypatch.setattr(registry.mlflow, "log_artifact", outage)
    try:
        started = time.monotonic()
        with pytest.raises(MlflowException):
            pipeline.register(cfg, paths, key)
        assert time.monotonic() - started < 120  # fails within the configured timeout, for the task to retry
        monkeypatch.setattr(registry.mlflow, "log_artifact", original)
        server.start()
        registered = pipeline.register(cfg, paths, key)  # the retry, once the server is back
        server.stop()
        with pytest.raises(MlflowException):
            pipeline.promote(cfg, paths, key)
        server.start()
        assert pipeline.promote(cfg, paths, key)["promoted"]  # the retry

        client = MlflowClient(server.url)
        (version,) = client.search_model_versions("name='faults-outage'")
        assert str(version.version) == registered["version"]
        assert client.get_registered_model("faults-outage").aliases == {"champion": registered["version"]}
        assert client.get_run(version.run_id).info.status == "FINISHED" and version.tags["decision"] == "promoted"
        runs = client.search_runs([client.get_experiment_by_name(cfg.registry.experiment).experiment_id],
                                  "tags.`pipeline.run_key` = 'outage'")
        assert sorted(r.info.status for r in runs) == ["FINISHED", "KILLED"]  # the interrupted attempt, closed
    finally:
        server.stop()
        mlflow.set_tracking_uri(None)


def test_wrong_mlflow_credentials_or_no_write_permission_fail_before_training(tiny_model: Path, tmp_path: Path) -> None:
    """Against MLflow with authentication: a wrong password, and a user who may only read the
    run's experiment, each end the pipeline at preflight with one line naming the server, exit 2."""
    import base64
    import json
    import urllib.request

    server = MlflowServer(tmp_path / "mlflow", admin_password="right-password")
    server.start()
    try:
        admin = {"Authorization": "Basic " + base64.b64encode(b"admin:right-password").decode(),
                 "Content-Type": "application/json"}

        def call(path: str, body: dict[str, Any]) -> Any:
            req = urllib.request.Request(f"{server.url}{path}", data=json.dumps(body).encode(), headers=admin)
            with urllib.request.urlopen(req, timeout=30) as resp:
                return json.loads(resp.read() or b"{}")

        experiment = call("/api/2.0/mlflow/experiments/create", {"name": "e2e"})["experiment_id"]
        call("/api/2.0/mlflow/users/create", {"username": "reader", "password": "reader-password"})
        call("/api/3.0/mlflow/users/permissions/grant",
             {"username": "reader", "resource_type": "experiment", "resource_id": experiment, "permission": "READ"})
        for user, password, why in (("admin", "wrong-password", "401"), ("reader", "reader-password", "403")):
            out = subprocess.run(
                [sys.executable, "-m", "ml", "pipeline", "--profile", "e2e", "--set", f"output_dir={tmp_path / user}",
                 "--set", f"registry.tracking_uri={server.url}", "--set", "registry.request_retries=0"],
                cwd=ROOT, capture_output=True, text=True, timeout=300,
                env={**os.environ, "MLFLOW_TRACKING_USERNAME": user, "MLFLOW_TRACKING_PASSWORD": password})
            assert out.returncode == 2, out.stderr[-2000:]
            (line,) = [x for x in out.stderr.splitlines() if x.startswith("error:")]
            assert f"MLflow at {server.url} cannot be used by this run (nothing was trained)" in line, line
            assert why in line and "Traceback" not in out.stderr
            assert not list((tmp_path / user).glob("*/train")) and password not in out.stderr
    finally:
        server.stop()


def test_an_account_reads_no_champion_where_it_sees_no_model_and_never_takes_anothers(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """MLflow's auth answers 403, not 404, for a model that does not exist. The pipeline's own
    account (docker-compose.yaml) must read that as "no champion yet" - its first run creates the
    model - and must refuse, naming it, a model another account created."""
    import base64
    import json
    import urllib.error
    import urllib.request

    import mlflow
    from mlflow import MlflowClient

    from ml import champion, tracking
    from ml.config import RegistryConfig
    from ml.registry import _create_version

    server = MlflowServer(tmp_path / "mlflow", admin_password="right-password")
    server.start()
    try:
        admin = {"Authorization": "Basic " + base64.b64encode(b"admin:right-password").decode(),
                 "Content-Type": "application/json"}
        for path, body in (("/api/2.0/mlflow/users/create", {"username": "pipeline", "password": "pipeline-password"}),
                           ("/api/2.0/mlflow/registered-models/create", {"name": "people-made"})):
            req = urllib.request.Request(f"{server.url}{path}", data=json.dumps(body).encode(), headers=admin)
            try:
                urllib.request.urlopen(req, timeout=30).close()
            except urllib.error.HTTPError as err:
                raise AssertionError(f"{path}: {err.read()!r}") from err
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "pipeline")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "pipeline-password")
        reg = RegistryConfig(tracking_uri=server.url, model_name="not-yet", request_retries=0)
        client = MlflowClient(server.url)
        with pytest.raises(Exception, match="PERMISSION_DENIED|403"):  # what the server answers
            client.get_model_version_by_alias("not-yet", "champion")
        assert champion.version(tracking.connect(reg), reg) is None  # read as: no champion yet
        client.create_registered_model("not-yet")  # its first run creates it, and owns it
        assert champion.version(tracking.connect(reg), reg) is None  # its own model, still without a champion: 404 now
        with pytest.raises(RegistryUnavailable, match="'people-made' exists but this MLflow account cannot read it"):
            _create_version(client, "people-made", None, "", {})
    finally:
        server.stop()
        mlflow.set_tracking_uri(None)


def test_mlflow_down_as_training_ends_keeps_the_training_and_the_retry_trains_nothing(
        tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A server of its own goes away once the training run is open (the trainer, which talks to no
    MLflow, trains on) and is back for the task's retry: the finished training is kept, the retry
    trains no step, and the version registered from it is complete."""
    import mlflow
    from mlflow import MlflowClient

    from ml import tracking
    from ml.identity import adapter_hash

    monkeypatch.setattr(tracking, "CLOSE_WAITS_S", (0.5,))
    server = MlflowServer(tmp_path / "mlflow")
    server.start()
    cfg = load_config("e2e", {"output_dir": str(tmp_path / "runs"), "registry.tracking_uri": server.url,
                              "registry.request_retries": 0, "registry.request_timeout_s": 5,
                              "registry.model_name": "faults-train-outage", "train.max_steps": 10})
    key = "outage__2026-12-06T19:30:00+00:00"  # an Airflow run id: its folder escapes ":" and "+"
    paths = run_paths(cfg, key)
    cfg = pipeline.freeze(cfg, paths, first=True)
    pipeline.load(cfg, paths)
    pipeline.prepare(cfg, paths)
    try:
        trained = pipeline.train(cfg, paths, opened=lambda run_id: server.stop())
        assert trained["global_step"] == 10 and "reused" not in trained
        server.start()
        curve, adapter = paths.trained.metrics.read_bytes(), adapter_hash(paths.trained.adapter)
        again = pipeline.train(cfg, paths)  # what the task's retry runs
        assert again["reused"] and again["global_step"] == 10
        assert paths.trained.metrics.read_bytes() == curve and adapter_hash(paths.trained.adapter) == adapter

        pipeline.evaluate(cfg, paths)
        registered = pipeline.register(cfg, paths, key)
        client = MlflowClient(server.url)
        version = client.get_model_version("faults-train-outage", registered["version"])
        assert version.tags["adapter_sha256"] == adapter
        run = client.get_run(version.run_id)
        assert run.info.status == "FINISHED" and "train.max_steps" in run.data.params
        assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == list(range(1, 11))
        runs = client.search_runs([client.get_experiment_by_name(cfg.registry.experiment).experiment_id],
                                  f"tags.`pipeline.run_key` = '{key}'")
        assert sorted(r.info.status for r in runs) == ["FINISHED", "KILLED"]  # the training run, closed by register
    finally:
        server.stop()
        mlflow.set_tracking_uri(None)
