"""Faults a run meets when nobody watches: MLflow down or hung, a worker killed in the middle of a
registry step. Real processes: an MLflow server, a socket that never answers, a process that dies."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ROOT

from ml import pipeline
from ml.config import load_config
from ml.errors import RegistryUnavailable
from ml.runs import read_json

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
        pipeline.run_all(cfg, "server-down")
    assert not (pipeline.run_paths(cfg, "server-down").train).exists()


def test_a_hung_tracking_server_ends_the_step_within_its_timeout(silent_server: str, tmp_path: Path) -> None:
    cfg = load_config("e2e", {"output_dir": str(tmp_path), "registry.tracking_uri": silent_server,
                              "registry.request_retries": 0, "registry.request_timeout_s": 2})
    started = time.monotonic()
    with pytest.raises(RegistryUnavailable, match=silent_server):
        pipeline.preflight(cfg, pipeline.run_paths(cfg, "hung"))
    assert time.monotonic() - started < 60  # MLflow's own defaults: 120 s per request, 7 retries


def _killed_in(step: str, owner: str, name: str, run_dir: Path) -> subprocess.CompletedProcess[str]:
    """Run `pipeline.<step>` in a process that dies (os._exit: no cleanup, like SIGKILL) right
    after its first call of `<owner>.<name>` returns."""
    code = (
        "import json, os, pathlib\n"
        "import mlflow\n"
        "from ml import pipeline, registry\n"
        "from ml.config import PipelineConfig\n"
        f"original = getattr({owner}, {name!r})\n"
        "def dying(*args, **kwargs):\n"
        "    original(*args, **kwargs)\n"
        "    os._exit(9)\n"
        f"setattr({owner}, {name!r}, dying)\n"
        f"paths = pipeline.RunPaths(pathlib.Path({str(run_dir)!r}))\n"
        "cfg = PipelineConfig.model_validate(json.loads((paths.root / 'config.json').read_text()))\n"
        f"pipeline.{step}(cfg, paths, paths.root.name)\n")
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_a_worker_killed_in_register_or_promote_and_retried_leaves_one_finished_version(
        tracking: str, tiny_model: Path, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    name = "faults-tiny-lora"
    cfg = load_config("e2e", {"output_dir": str(tmp_path), "train.max_steps": 30, "registry.model_name": name})
    paths = pipeline.run_paths(cfg, "killed")
    cfg = pipeline.freeze(cfg, paths)  # what the killed processes read
    for step in (pipeline.load, pipeline.validate, pipeline.prepare, pipeline.train, pipeline.evaluate):
        step(cfg, paths)
    assert read_json(paths.reports / "evaluation.json")["decision"]["outcome"] == "promote"
    client = MlflowClient(tracking)

    # killed right after the version was registered: its run still open, its decision tags unwritten
    assert _killed_in("register", "mlflow", "register_model", paths.root).returncode == 9
    (version,) = client.search_model_versions(f"name='{name}'")
    assert client.get_run(version.run_id).info.status == "RUNNING" and "decision_reason" not in version.tags
    retried = pipeline.register(cfg, paths, "killed")  # the task's retry
    (again,) = client.search_model_versions(f"name='{name}'")
    assert retried["version"] == str(version.version) == str(again.version)
    assert client.get_run(version.run_id).info.status == "FINISHED" and "decision_reason" in again.tags
    artifacts = {a.path for a in client.list_artifacts(version.run_id, "reports")}
    assert {"reports/evaluation.json", "reports/train_rows.json", "reports/loss_curve.png"} <= artifacts

    # killed right after the alias moved, before the outcome was recorded
    assert _killed_in("promote", "registry", "move_champion", paths.root).returncode == 9
    assert client.get_registered_model(name).aliases == {"champion": version.version}
    assert client.get_model_version(name, version.version).tags["decision"] == "promote"  # not yet "promoted"
    result = pipeline.promote(cfg, paths, "killed")  # the retry finishes the bookkeeping, scores nothing again
    assert result["promoted"] and client.get_model_version(name, version.version).tags["decision"] == "promoted"
    assert client.get_registered_model(name).aliases == {"champion": version.version}
    assert len(client.search_model_versions(f"name='{name}'")) == 1
