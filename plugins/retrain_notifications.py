"""Who is told what a retrain did, through Airflow's notifier mechanism.

`RetrainNotifier("failure")` is every task's `on_failure_callback`: which task failed, why, and the
link to its log. `RetrainNotifier("decision")` is the `summary` task's `on_success_callback` and
`preflight`'s `on_skipped_callback`: promoted, kept, needs review or skipped, with both losses, the
reason and the MLflow link. `RetrainNotifier("approval")` is the approval gate's: a person's
approval is asked, where to give it and until when.

The channels are Airflow connections, each optional:

- `retrain_smtp`: an SMTP server (host, port, login and password; extras `from_email`, and `to`:
  comma-separated recipients), sent through the SMTP provider's `SmtpNotifier`;
- `retrain_webhook`: an endpoint taking Slack's incoming-webhook JSON (`{"text": ...}`), e.g.
  `AIRFLOW_CONN_RETRAIN_WEBHOOK=https://hooks.slack.com/services/...`; Mattermost, Rocket.Chat and
  Teams' Slack-compatible hooks take the same.

With neither, the message goes to the task log only. A channel that fails is logged as a warning
and changes nothing about the task; the webhook's URL (a secret) is never logged.
"""

from __future__ import annotations

import html
import json
import logging
import urllib.parse
import urllib.request
from typing import Any, Literal

from airflow.providers.smtp.notifications.smtp import SmtpNotifier
from airflow.sdk import BaseNotifier, Connection
from airflow.sdk.exceptions import AirflowNotFoundException
from mlflow_links import version_url

from ml.config import redact

log = logging.getLogger(__name__)

SMTP_CONN_ID = "retrain_smtp"
WEBHOOK_CONN_ID = "retrain_webhook"
OUTCOMES = {"promote": "PROMOTED", "keep": "kept the champion", "needs_review": "NEEDS REVIEW",
            "skipped": "skipped"}


def _connection(conn_id: str) -> Connection | None:
    try:
        return Connection.get(conn_id)
    except AirflowNotFoundException:
        return None


def webhook_url(conn: Connection) -> str:
    """The URL of a webhook connection: its host when that is a whole URL, else rebuilt from its parts
    (`https://hooks.example/services/X` parses as type https, host hooks.example, schema services/X)."""
    if conn.host and "://" in conn.host:
        return str(conn.host)
    port = f":{conn.port}" if conn.port else ""
    return f"{conn.conn_type or 'https'}://{conn.host}{port}/{conn.schema or ''}"


def failure_message(context: Any) -> tuple[str, str]:
    ti, run_id = context["ti"], context["run_id"]
    error = context.get("exception")
    why = redact(f"{type(error).__name__}: {error}") if error else "(no exception recorded)"  # a URI's password
    subject = f"{ti.dag_id}: task {ti.task_id} failed (run {run_id})"
    body = (f"Task {ti.task_id} of {ti.dag_id} failed on try {ti.try_number}, run {run_id}.\n"
            f"Why: {why[:2000]}\nLog: {ti.log_url}")
    return subject, body


def approval_message(context: Any) -> tuple[str, str]:
    ti, run_id, task = context["ti"], context["run_id"], context["task"]
    subject = f"{ti.dag_id}: approval needed - {task.subject}"
    waits = f"{task.response_timeout.total_seconds() / 3600:g} h" if task.response_timeout else "no time limit"
    body = (f"Run {run_id} of {ti.dag_id} asks a person to approve or reject its model version before "
            f"@champion moves; without an answer within {waits} the champion stays.\n"
            f"Answer in Airflow (Required Actions of the run): {ti.log_url}\n\n{task.body[:3000]}")
    return subject, body


def decision_message(context: Any) -> tuple[str, str]:
    ti, run_id = context["ti"], context["run_id"]
    if ti.task_id != "summary":  # preflight skipped the run before training, and said why
        reason = ti.xcom_pull(task_ids=ti.task_id, key="skipped")
        return f"{ti.dag_id}: run {run_id} skipped", f"Run {run_id} of {ti.dag_id} trained nothing: {reason}"
    s = ti.xcom_pull(task_ids="summary")
    outcome = OUTCOMES.get(s["outcome"], s["outcome"])
    subject = f"{ti.dag_id}: {outcome} - {s['model_name']} v{s['version']}"
    guardrails = "".join(f"- {line}\n" for line in s.get("guardrails", []))
    body = (f"Run {run_id} of {ti.dag_id}: {outcome}.\n"
            f"Test loss per answer token: challenger {s['challenger_loss']:.4f} vs {s['baseline']} "
            f"{s['baseline_loss']:.4f}.\n{s['reason']}\n{guardrails}"
            f"Data: {s['data_source']} ({s['rows']} rows, fingerprint {s['fingerprint'][:12]}).\n"
            f"MLflow: {version_url(s['model_name'], s['version'])}\nLog: {ti.log_url}")
    return subject, body


MESSAGES = {"failure": failure_message, "decision": decision_message, "approval": approval_message}


class RetrainNotifier(BaseNotifier):
    """A failed task or a decision, to every configured channel and the task log."""

    def __init__(self, kind: Literal["failure", "decision", "approval"], smtp_conn_id: str = SMTP_CONN_ID,
                 webhook_conn_id: str = WEBHOOK_CONN_ID) -> None:
        super().__init__()
        self.kind, self.smtp_conn_id, self.webhook_conn_id = kind, smtp_conn_id, webhook_conn_id

    def notify(self, context: Any) -> None:
        subject, body = MESSAGES[self.kind](context)
        log.info("notification: %s\n%s", subject, body)
        smtp, hook = _connection(self.smtp_conn_id), _connection(self.webhook_conn_id)
        if smtp is None and hook is None:
            log.info("no %s or %s connection: the notification is in this log only", self.smtp_conn_id,
                     self.webhook_conn_id)
        if smtp is not None:
            try:
                to = [a.strip() for a in str(smtp.extra_dejson.get("to", "")).split(",") if a.strip()]
                if not to:
                    raise ValueError(f"connection {self.smtp_conn_id} names no recipients (extra 'to')")
                SmtpNotifier(to=to, subject=subject, html_content=f"<pre>{html.escape(body)}</pre>",
                             smtp_conn_id=self.smtp_conn_id).notify(context)
                log.info("sent by e-mail to %s", ", ".join(to))
            except Exception as exc:  # noqa: BLE001  (a channel's failure must not change the task)
                log.warning("e-mail notification through %s failed: %s", self.smtp_conn_id, exc)
        if hook is not None:
            try:
                req = urllib.request.Request(webhook_url(hook), method="POST",
                                             data=json.dumps({"text": f"*{subject}*\n{body}"}).encode(),
                                             headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(req, timeout=10) as resp:
                    resp.read()
                log.info("posted to the webhook of %s (%s)", self.webhook_conn_id,
                         urllib.parse.urlsplit(webhook_url(hook)).hostname)
            except Exception as exc:  # noqa: BLE001  (its message may quote the URL, a secret: not logged)
                log.warning("webhook notification through %s failed: %s %s", self.webhook_conn_id,
                            type(exc).__name__, getattr(exc, "code", ""))
