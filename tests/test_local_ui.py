"""`make up` / `make down` as a user runs them: both UIs answer, every listener of the stack is on
127.0.0.1, and `down` leaves no process behind."""

from __future__ import annotations

import os
import subprocess
import urllib.request
from pathlib import Path

import psutil
import pytest
from conftest import ROOT, free_port

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def _stack_processes(state: Path) -> list[psutil.Process]:
    """Every process of the sessions `make up` started (their leaders' pids are in the pid files)."""
    leaders = {int(f.read_text()) for f in state.glob("*.pid")}
    found = []
    for proc in psutil.process_iter():
        try:
            if os.getsid(proc.pid) in leaders:
                found.append(proc)
        except (ProcessLookupError, psutil.NoSuchProcess):
            continue
    return found


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
    finally:
        down = subprocess.run(["make", "down"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert down.returncode == 0, down.stderr[-2000:]
    assert [p for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE] == []
