"""A person's approval before @champion moves, in real Airflow runs: api-server, scheduler and
dag-processor (LocalExecutor, Postgres metadata) and the session's MLflow server. The approval gate
(`promote_or_keep`, Airflow's human-in-the-loop branch) waits in the awaiting-input state; the test
answers it through Airflow's REST API, as a reviewer's browser does, logged in as `tester`."""

from __future__ import annotations

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
from conftest import PROFILES, ROOT, free_port, http_json

pytestmark = [pytest.mark.slow, pytest.mark.integration]
MODEL = "approval-tiny-lora"


def _reachable(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


if not _reachable(5432):
    pytest.skip("needs Postgres on 127.0.0.1:5432", allow_module_level=True)

# Profiles the runs pick from the trigger form: approval asked by the profile, with a short wait.
(PROFILES / "e2e-approval.yaml").write_text(f"extends: e2e-manual\nregistry:\n  model_name: {MODEL}\n"
                                            "  approval: required\n")
(PROFILES / "e2e-approval-fast.yaml").write_text("extends: e2e-approval\nregistry:\n  approval_timeout_h: 0.006\n")
(PROFILES / "e2e-approval-form.yaml").write_text(f"extends: e2e-manual\nregistry:\n  model_name: {MODEL}-form\n")


class Stack:
    def __init__(self, url: str, auth: dict[str, str], procs: dict[str, subprocess.Popen[bytes]], logs: Path,
                 env: dict[str, str]) -> None:
        self.url, self.auth, self.procs, self.logs, self.env = url, auth, procs, logs, env

    def wait(self, what: str, check: Any, timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            result = check()
            if result:
                return result
            dead = [n for n, p in self.procs.items() if p.poll() is not None]
            assert not dead, f"{dead} exited: " + (self.logs / f"{dead[0]}.log").read_text()[-3000:]
            time.sleep(2)
        tails = {n: (self.logs / f"{n}.log").read_text()[-1500:] for n in self.procs}
        raise AssertionError(f"timed out waiting for {what}: {json.dumps(tails, indent=1)}")

    def api(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        return http_json(method, f"{self.url}/api/v2/dags/retrain_lora{path}", body, self.auth)

    def trigger(self, conf: dict[str, Any]) -> str:
        status, run = self.api("POST", "/dagRuns", {"logical_date": None, "conf": conf})
        assert status in (200, 201), run
        return str(run["dag_run_id"])

    def state(self, run_id: str, task: str) -> str | None:
        code, ti = self.api("GET", f"/dagRuns/{run_id}/taskInstances/{task}")
        return ti.get("state") if code == 200 else None

    def awaiting(self, run_id: str) -> dict[str, Any]:
        """The approval request, once the gate waits for an answer."""
        def asking() -> bool:
            state = self.state(run_id, "promote_or_keep")
            assert state not in ("failed", "upstream_failed", "skipped", "success"), (state, self.failure(run_id))
            return state == "awaiting_input"

        self.wait("the approval request", asking, 600)
        # A person answers after seconds, not within the scheduler loop that sees the parking worker
        # exit: an answer that fast can lose a race in Airflow 3.3's scheduler (the worker's "success"
        # event meets a task already queued to resume, and the scheduler fails it).
        time.sleep(6)
        code, detail = self.api("GET", f"/dagRuns/{run_id}/taskInstances/promote_or_keep/-1/hitlDetails")
        assert code == 200, detail
        return dict(detail)

    def answer(self, run_id: str, option: str, comment: str) -> None:
        code, body = self.api("PATCH", f"/dagRuns/{run_id}/taskInstances/promote_or_keep/-1/hitlDetails",
                              {"chosen_options": [option], "params_input": {"comment": comment}})
        assert code == 200, body

    def finished(self, run_id: str) -> str:
        def done() -> str | None:
            code, run = self.api("GET", f"/dagRuns/{run_id}")
            return run["state"] if code == 200 and run["state"] in ("success", "failed") else None

        return str(self.wait(f"run {run_id}", done, 600))

    def failure(self, run_id: str) -> str:
        """The log of the first task of the run that failed."""
        code, tis = self.api("GET", f"/dagRuns/{run_id}/taskInstances")
        failed = [t["task_id"] for t in tis.get("task_instances", []) if t["state"] == "failed"]
        return self.log(run_id, failed[0])[-3000:] if failed else "no failed task"

    def log(self, run_id: str, task: str) -> str:
        code, log = http_json("GET", f"{self.url}/api/v2/dags/retrain_lora/dagRuns/{run_id}/taskInstances/{task}"
                              "/logs/1?full_content=true", headers={**self.auth, "Accept": "application/json"})
        assert code == 200, log
        return "\n".join(str(e.get("event", "")) for e in log["content"] if isinstance(e, dict))


@pytest.fixture(scope="module")
def stack(mlflow_server: str, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    import psycopg2
    from cryptography.fernet import Fernet

    tmp = tmp_path_factory.mktemp("approval")
    logs = tmp / "logs"
    logs.mkdir()
    db = f"retrain_approval_{secrets.token_hex(4)}"
    conn = psycopg2.connect(dbname="postgres", host="127.0.0.1", port=5432, user="postgres")
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(f"CREATE DATABASE {db}")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    (tmp / "passwords.json").write_text(json.dumps({"tester": "tester-password"}))
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server, "AIRFLOW_HOME": str(tmp / "airflow"),
           "AIRFLOW__CORE__EXECUTOR": "LocalExecutor", "AIRFLOW__CORE__PARALLELISM": "2",
           "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"postgresql+psycopg2://postgres@127.0.0.1:5432/{db}",
           "AIRFLOW__CORE__FERNET_KEY": Fernet.generate_key().decode(),
           "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_hex(16), "AIRFLOW__API__SECRET_KEY": secrets.token_hex(16),
           "AIRFLOW__API__HOST": "127.0.0.1", "AIRFLOW__API__PORT": str(port), "AIRFLOW__API__BASE_URL": url,
           "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{url}/execution/",
           "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "tester:admin",
           "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(tmp / "passwords.json"),
           "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False", "RETRAIN_PROFILE": "e2e-manual",
           "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5", "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "2"}
    procs: dict[str, subprocess.Popen[bytes]] = {}
    try:
        for cmd in (["db", "migrate"], ["pools", "set", "mlflow_registry", "1", "registry"]):
            done = subprocess.run([sys.executable, "-m", "airflow", *cmd], env=env, capture_output=True, text=True,
                                  timeout=300)
            assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
        for name in ("api-server", "scheduler", "dag-processor"):
            procs[name] = subprocess.Popen([sys.executable, "-m", "airflow", name], env=env, cwd=ROOT,
                                           stdout=(logs / f"{name}.log").open("wb"), stderr=subprocess.STDOUT,
                                           start_new_session=True)
        stack = Stack(url, {}, procs, logs, env)
        stack.wait("the api-server", lambda: http_json("GET", f"{url}/api/v2/monitor/health")[0] == 200, 240)
        status, body = http_json("POST", f"{url}/auth/token", {"username": "tester", "password": "tester-password"})
        assert status in (200, 201), body
        stack.auth = {"Authorization": f"Bearer {body['access_token']}"}
        stack.wait("the DAG to be parsed", lambda: stack.api("GET", "")[0] == 200, 240)
        yield stack
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        with conn.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
        conn.close()


def _version(mlflow_server: str, version: str) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(mlflow_server).get_model_version(MODEL, version)


def _champion(mlflow_server: str) -> str | None:
    from mlflow import MlflowClient

    aliases = MlflowClient(mlflow_server).get_registered_model(MODEL).aliases
    return str(aliases["champion"]) if "champion" in aliases else None


def test_an_approved_version_takes_the_alias_with_its_approver_on_record(stack: Stack, mlflow_server: str) -> None:
    """Approval asked per trigger (the form's `approval` field) of a profile that does not ask."""
    run_id = stack.trigger({"profile": "e2e-approval-form", "approval": "required", "max_steps": 10})
    request = stack.awaiting(run_id)
    assert request["options"] == ["Promote", "Keep"] and request["defaults"] == ["Keep"]
    assert "| test loss per answer token |" in request["body"] and "(guardrail, margin" in request["body"]
    assert "[MLflow model version](" in request["body"] and list(request["params"]) == ["comment"]
    assert stack.state(run_id, "promote_champion") is None  # nothing moves while it waits
    stack.answer(run_id, "Promote", "answers read well")
    assert stack.finished(run_id) == "success"
    assert "approval needed" in stack.log(run_id, "promote_or_keep")  # people were asked
    from mlflow import MlflowClient

    client = MlflowClient(mlflow_server)
    (v,) = client.search_model_versions(f"name='{MODEL}-form'")
    assert client.get_registered_model(f"{MODEL}-form").aliases == {"champion": v.version}
    assert v.tags["decision"] == "promoted" and v.tags["review"].startswith("approved by tester at ")
    assert v.tags["review"].endswith(": answers read well") and "**Review** approved by tester" in v.description


def test_a_rejection_keeps_the_champion_and_records_who_and_why(stack: Stack, mlflow_server: str) -> None:
    first = stack.trigger({"profile": "e2e-approval", "max_steps": 10})
    stack.awaiting(first)
    stack.answer(first, "Promote", "first version")
    assert stack.finished(first) == "success" and _champion(mlflow_server) == "1"
    second = stack.trigger({"profile": "e2e-approval", "max_steps": 60})  # the rule would promote it
    stack.awaiting(second)
    stack.answer(second, "Keep", "answers too long")
    assert stack.finished(second) == "success"
    assert _champion(mlflow_server) == "1"
    v2 = _version(mlflow_server, "2")
    assert v2.tags["decision"] == "rejected" and v2.tags["review"].endswith(": answers too long")
    assert "REJECTED: rejected by tester" in stack.log(second, "summary")


def test_no_answer_in_time_keeps_the_champion_and_people_are_told(stack: Stack, mlflow_server: str) -> None:
    run_id = stack.trigger({"profile": "e2e-approval-fast", "max_steps": 60})  # a 21 s wait
    stack.awaiting(run_id)
    assert stack.finished(run_id) == "success"  # nobody answered: the scheduler took the default
    assert _champion(mlflow_server) == "1"
    versions = sorted(int(v) for v in _versions(mlflow_server))
    latest = _version(mlflow_server, str(versions[-1]))
    assert latest.tags["decision"] == "rejected" and latest.tags["review"].startswith("no answer by ")
    summary = stack.log(run_id, "summary")
    assert "NO ANSWER to the approval request" in summary and "notification: retrain_lora: kept the champion" in summary


def test_an_approval_given_after_a_person_moved_the_champion_does_not_promote_blindly(
        stack: Stack, mlflow_server: str) -> None:
    run_id = stack.trigger({"profile": "e2e-approval", "max_steps": 90})
    stack.awaiting(run_id)
    moved = subprocess.run([sys.executable, "-m", "ml", "promote", "--profile", "e2e-approval", "--version", "2",
                            "--reason", "v2 after all"], cwd=ROOT, env=stack.env, capture_output=True, text=True)
    assert moved.returncode == 0, moved.stderr[-2000:]
    stack.answer(run_id, "Promote", "looks better")
    assert stack.finished(run_id) == "success"
    assert _champion(mlflow_server) == "2"  # the person's move stands
    latest = _version(mlflow_server, str(max(int(v) for v in _versions(mlflow_server))))
    assert latest.tags["decision"] == "needs_review" and "moved by hand" in stack.log(run_id, "promote_champion")


def _versions(mlflow_server: str) -> list[str]:
    from mlflow import MlflowClient

    return [v.version for v in MlflowClient(mlflow_server).search_model_versions(f"name='{MODEL}'")]
