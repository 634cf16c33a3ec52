"""Airflow listener plugin: a finished DAG run's note says what it decided and why, on the runs list.

A task pushes the line as an XCom under `RUN_NOTE_KEY` (the DAG's summary: promoted or kept and
why; preflight: skipped and why; validate: the failed gate); when the run ends, this listener,
which runs where the run's state changes (the scheduler, the API server when a person marks the
run, `dag.test()`), copies it to the run's note. Tasks cannot set it themselves: the Task SDK has
no call for a run's note (apache/airflow#64890). A failed run with no line gets "failed at
<task>". A note a person wrote (one with a user) is never replaced.
"""

from __future__ import annotations

import logging
import sys
from typing import TYPE_CHECKING

from airflow.listeners import hookimpl
from airflow.plugins_manager import AirflowPlugin

if TYPE_CHECKING:
    from airflow.models.dagrun import DagRun
    from sqlalchemy.orm import Session

log = logging.getLogger(__name__)

RUN_NOTE_KEY = "run_note"
NOTE_LIMIT = 1000  # Airflow's dag_run_note.content column


def note_line(outcome: str, reason: str) -> str:
    """One line: the outcome, then the reason (its first line)."""
    first = reason.strip().splitlines()[0] if reason.strip() else ""
    text = f"{outcome}: {first}" if first else outcome
    return text if len(text) <= NOTE_LIMIT else text[:NOTE_LIMIT - 1] + "…"


def _pushed_note(dag_run: DagRun, session: Session) -> str | None:
    """The last line a task of this run pushed under RUN_NOTE_KEY."""
    from airflow.models.xcom import XComModel

    query = XComModel.get_many(run_id=dag_run.run_id, dag_ids=dag_run.dag_id, key=RUN_NOTE_KEY, limit=1)
    row = session.scalars(query).first()  # the newest first
    return str(XComModel.deserialize_value(row)) if row is not None else None


def _set_note(dag_run: DagRun, failed: bool) -> None:
    from sqlalchemy.orm import Session

    session = Session.object_session(dag_run)
    if session is not None:  # the caller's, which saves the run's new state (and holds its row's lock)
        _write(dag_run, session, failed)
        return
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session

    with create_session() as own:  # a run held outside any session (dag.test()): a short transaction
        attached = own.get(DagRun, dag_run.id)
        if attached is not None:
            _write(attached, own, failed)


def _write(dag_run: DagRun, session: Session, failed: bool) -> None:
    note = dag_run.dag_run_note
    if note is not None and note.user_id:  # a person's note stays
        return
    text = _pushed_note(dag_run, session)
    if text is None and failed:
        tasks = sorted(ti.task_id for ti in dag_run.get_task_instances(state=["failed"], session=session))
        text = f"failed at {', '.join(tasks)}" if tasks else "failed"
    if text:
        dag_run.note = text[:NOTE_LIMIT]


def _safely(dag_run: DagRun, failed: bool) -> None:
    try:
        _set_note(dag_run, failed)
    except Exception:  # noqa: BLE001  (a note must never change how a run ends)
        log.exception("could not set the note of %s", dag_run.run_id)


@hookimpl
def on_dag_run_success(dag_run: DagRun, msg: str) -> None:
    _safely(dag_run, failed=False)


@hookimpl
def on_dag_run_failed(dag_run: DagRun, msg: str) -> None:
    _safely(dag_run, failed=True)


class RunNotesPlugin(AirflowPlugin):
    name = "run_notes"
    listeners = [sys.modules[__name__]]  # this module: the hooks above
