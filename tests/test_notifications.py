"""The notifier's channels, each optional: none configured, a webhook given as a URI, a channel
that fails. (Messages over real SMTP and HTTP, from real DAG runs: tests/test_e2e.py.)"""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace
from typing import Any

import airflow  # noqa: F401  (puts plugins/ on sys.path, as for DAGs)
import pytest
from conftest import free_port


def _context() -> dict[str, Any]:
    """What a task's failure callback receives, as far as the notifier reads it."""
    ti = SimpleNamespace(dag_id="retrain_lora", task_id="train", try_number=2,
                         log_url="http://airflow.example/dags/retrain_lora/runs/r1/tasks/train?try_number=2")
    return {"ti": ti, "run_id": "r1", "exception": RuntimeError("CUDA ran out of memory")}


def test_without_connections_the_message_goes_to_the_log_only(caplog: pytest.LogCaptureFixture,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from retrain_notifications import RetrainNotifier

    monkeypatch.delenv("AIRFLOW_CONN_RETRAIN_SMTP", raising=False)
    monkeypatch.delenv("AIRFLOW_CONN_RETRAIN_WEBHOOK", raising=False)
    with caplog.at_level(logging.INFO, logger="retrain_notifications"):
        RetrainNotifier("failure").notify(_context())
    assert "retrain_lora: task train failed (run r1)" in caplog.text
    assert "RuntimeError: CUDA ran out of memory" in caplog.text and "tasks/train?try_number=2" in caplog.text
    assert "the notification is in this log only" in caplog.text


def test_a_webhook_given_as_a_uri_is_posted_to_that_url() -> None:
    from airflow.sdk import Connection
    from retrain_notifications import webhook_url

    for url in ("https://hooks.example.test/services/T0/B0/secret", "http://127.0.0.1:8765/hooks/retrain"):
        assert webhook_url(Connection.from_uri(url, conn_id="retrain_webhook")) == url
    whole = Connection(conn_id="retrain_webhook", conn_type="http", host="https://chat.example.test/hooks/abc")
    assert webhook_url(whole) == "https://chat.example.test/hooks/abc"


def test_a_channel_that_fails_is_a_warning_that_keeps_its_secret(caplog: pytest.LogCaptureFixture,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from retrain_notifications import RetrainNotifier

    port = free_port()  # nothing listens there
    monkeypatch.setenv("AIRFLOW_CONN_RETRAIN_WEBHOOK", f"http://127.0.0.1:{port}/hooks/s3cr3t-token")
    monkeypatch.setenv("AIRFLOW_CONN_RETRAIN_SMTP", json.dumps(
        {"conn_type": "smtp", "host": "127.0.0.1", "port": port, "extra": {"from_email": "a@example.test"}}))
    with caplog.at_level(logging.INFO, logger="retrain_notifications"):
        RetrainNotifier("failure").notify(_context())  # raises nothing: the task's outcome stays
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("e-mail notification through retrain_smtp failed" in w and "names no recipients" in w
               for w in warnings), warnings
    assert any("webhook notification through retrain_webhook failed" in w for w in warnings), warnings
    assert "s3cr3t-token" not in caplog.text
