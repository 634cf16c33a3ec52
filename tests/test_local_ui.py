"""`make up` / `make down` and `make airflow-ui` as a user runs them: both UIs answer, every listener
of the stack is on 127.0.0.1, `down` leaves no process behind, the all-admin Airflow API answers
only requests addressed to a loopback name (no admin token for a DNS-rebound web page), and
`make airflow-ui` starts a handful of processes (sized for a laptop)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import psutil
import pytest
from conftest import ROOT, free_port, http_json

pytestmark = [pytest.mark.slow, pytest.mark.integration]
FOREIGN_HOST = "rebind.attacker.example"  # a web page's name, re-pointed by its DNS at 127.0.0.1


def _stack_processes(state: Path) -> list[psutil.Process]:
    """Every process of the sessions `make up` started (their leaders' pids are in the pid files)."""
    return _session_processes({int(f.read_text()) for f in state.glob("*.pid")})


def _session_processes(leaders: set[int]) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter():
        try:
            if os.getsid(proc.pid) in leaders:
                found.append(proc)
        except (ProcessLookupError, psutil.NoSuchProcess):
            continue
    return found


def _assert_sized_for_a_laptop(leader: int) -> None:
    """`make airflow-ui` starts a handful of processes, not ~40: the LocalExecutor forks [core]
    parallelism's workers when the scheduler starts (Airflow's default 32; scripts/airflow_local.sh
    says 2), beside one API worker, the scheduler, the dag processor and the triggerer."""
    def executor_workers() -> list[psutil.Process]:
        return [p for p in _session_processes({leader}) if "LocalExecutor" in " ".join(p.cmdline())]

    deadline = time.monotonic() + 120  # the scheduler may start its executor after the API answers
    while not executor_workers():
        assert time.monotonic() < deadline, [p.cmdline() for p in _session_processes({leader})]
        time.sleep(1)
    time.sleep(5)  # all of them are forked at once; a few seconds for a late straggler to show
    procs = _session_processes({leader})
    assert len(executor_workers()) == 2, [p.cmdline() for p in procs]
    # make, its shell, airflow_local.sh, api-server, scheduler + 2 workers, dag-processor, triggerer
    # (+ its trigger runner): 10 measured (40 with Airflow's defaults)
    assert len(procs) <= 12, [p.cmdline() for p in procs]


def _assert_answers_loopback_names_only(port: int) -> None:
    """Every user is admin: a request naming another host (DNS rebinding: the browser sends the
    page's own name) gets no token and triggers nothing; loopback names work as before."""
    url, foreign = f"http://127.0.0.1:{port}", {"Host": FOREIGN_HOST}
    for method, body in (("GET", None), ("POST", {"username": "x", "password": "y"})):
        status, answer = http_json(method, f"{url}/auth/token", body, headers=foreign)
        assert status == 400 and "access_token" not in str(answer), (method, status, answer)
    status, answer = http_json("GET", f"{url}/auth/token", headers={"Host": f"127.0.0.1:{port}"})
    assert status == 201 and answer["access_token"], (status, answer)
    # the whole API, not only /auth: a token from elsewhere does not queue a run through that name
    status, answer = http_json("POST", f"{url}/api/v2/dags/retrain_lora/dagRuns",
                               {"logical_date": None, "conf": {"max_steps": 1, "min_delta": 0}},
                               headers={**foreign, "Authorization": f"Bearer {answer['access_token']}"})
    assert status == 400, (status, answer)
    assert http_json("GET", f"{url}/api/v2/monitor/health", headers={"Host": f"localhost:{port}"})[0] == 200


def _assert_form_refuses_out_of_bounds_values(port: int) -> None:
    """What the trigger form sends on "Trigger": the API server refuses a value the config refuses,
    naming the field (the form shows that answer); nothing is queued."""
    url = f"http://127.0.0.1:{port}"
    token = http_json("GET", f"{url}/auth/token")[1]["access_token"]
    auth = {"Authorization": f"Bearer {token}"}
    deadline = time.monotonic() + 180  # the dag processor's first parse
    while http_json("GET", f"{url}/api/v2/dags/retrain_lora", headers=auth)[0] != 200:
        assert time.monotonic() < deadline, "retrain_lora was not parsed"
        time.sleep(2)
    for conf, refusal in (({"learning_rate": -1}, "learning_rate: -1 is less than or equal to the minimum of 0"),
                          ({"max_steps": 0}, "max_steps: 0 should not be valid"),
                          ({"lora_r": 2.5}, "lora_r: 2.5 is not of type 'null', 'integer'")):
        status, answer = http_json("POST", f"{url}/api/v2/dags/retrain_lora/dagRuns",
                                   {"logical_date": None, "conf": conf}, headers=auth)
        assert status == 400 and f"Invalid input for param {refusal}" in str(answer), (conf, status, answer)
    assert http_json("GET", f"{url}/api/v2/dags/retrain_lora/dagRuns", headers=auth)[1]["total_entries"] == 0


def test_make_up_listens_on_loopback_only_and_make_down_stops_it(tmp_path: Path) -> None:
    state = tmp_path / "stack"
    ml_port, af_port = free_port(), free_port()
    env = {**os.environ, "STACK_STATE": str(state), "MLFLOW_PORT": str(ml_port), "AIRFLOW_PORT": str(af_port)}
    up = subprocess.run(["make", "up"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    try:
        assert up.returncode == 0, up.stdout[-2000:] + up.stderr[-2000:]
        for url in (f"http://127.0.0.1:{ml_port}/health", f"http://127.0.0.1:{af_port}/api/v2/monitor/health"):
            with urllib.request.urlopen(url, timeout=10) as resp:
                assert resp.status == 200, url
        procs = _stack_processes(state)
        pids = {p.pid for p in procs}
        listening = [(c.laddr.ip, c.laddr.port, c.pid) for c in psutil.net_connections(kind="inet")
                     if c.status == psutil.CONN_LISTEN and c.pid in pids]
        names = {" ".join(p.cmdline()[1:4]) for p in procs}
        assert any("scheduler" in n for n in names) and any("triggerer" in n for n in names), names
        assert {port for _, port, _ in listening} >= {ml_port, af_port}
        assert all(ip == "127.0.0.1" for ip, _, _ in listening), listening  # no log server on 0.0.0.0
        _assert_answers_loopback_names_only(af_port)
    finally:
        down = subprocess.run(["make", "down"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert down.returncode == 0, down.stderr[-2000:]
    assert [p for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE] == []


def test_make_airflow_ui_answers_loopback_host_names_only(tmp_path: Path) -> None:
    """The same guard in `make airflow-ui` (the demo's state; here a fresh one in tmp_path), and
    the number of processes it starts."""
    port = free_port()
    env = {**os.environ, "AIRFLOW_PORT": str(port)}
    with open(tmp_path / "airflow-ui.log", "w") as log:  # its own session: stopped as one below
        ui = subprocess.Popen(["make", "airflow-ui", f"DEMO_STATE={tmp_path}"], cwd=ROOT, env=env,
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while http_json("GET", f"http://127.0.0.1:{port}/api/v2/monitor/health")[0] != 200:
            assert ui.poll() is None and time.monotonic() < deadline, (tmp_path / "airflow-ui.log").read_text()[-3000:]
            time.sleep(1)
        _assert_answers_loopback_names_only(port)
        _assert_sized_for_a_laptop(ui.pid)
        _assert_form_refuses_out_of_bounds_values(port)
    finally:
        procs = _session_processes({ui.pid})
        with contextlib.suppress(ProcessLookupError):  # Ctrl-C's way: airflow_local.sh stops its parts
            os.killpg(ui.pid, signal.SIGTERM)
        _, alive = psutil.wait_procs(procs, timeout=60)
        for proc in alive:
            proc.kill()
        ui.wait()
