"""The DAG as Airflow's own DagBag parses it."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from conftest import ROOT, imports_of

from ml.config import available_profiles
from ml.errors import ConfigError
from ml.params import PARAM_PATHS, config_from_params, field_schema


@pytest.fixture()
def dag(retrain_dag: Any) -> Any:
    return retrain_dag


def test_task_graph(dag: Any) -> None:
    edges = {(up, t.task_id) for t in dag.tasks for up in t.upstream_task_ids}
    assert edges == {
        ("load", "preflight"), ("preflight", "validate"), ("validate", "prepare"), ("prepare", "train"),
        ("train", "evaluate"),
        ("evaluate", "register"), ("evaluate", "promote_or_keep"), ("register", "promote_or_keep"),
        ("promote_or_keep", "promote_champion"), ("promote_or_keep", "keep_champion"),
        ("promote_champion", "summary"), ("keep_champion", "summary"),
        ("preflight", "summary"), ("evaluate", "summary"), ("register", "summary"),
    }
    assert dag.get_task("summary").trigger_rule == "none_failed_min_one_success"


def test_schedule_and_concurrency(dag: Any) -> None:
    assert dag.max_active_runs == 1
    assert dag.catchup is False
    from airflow.sdk import AssetOrTimeSchedule
    from retrain_schedule import GRACE

    from ml.config import load_config

    schedule = dag.timetable  # the profile's schedule or new data, whichever comes first
    assert isinstance(schedule, AssetOrTimeSchedule)
    assert [a.uri for a in schedule.asset_condition.objects] == [load_config("e2e").data.uri]
    assert load_config("e2e").data.uri.startswith("file:///") and load_config("e2e").data.uri.endswith(".jsonl")
    t = schedule.timetable  # plugins/retrain_schedule.py
    assert type(t).__name__ == "OnTimeCronTimetable" and t.summary == "0 0 * * 0 (missed times skipped)"
    assert t.grace == GRACE == timedelta(minutes=10)


def _scheduler_dag(dag: Any, stock_run_immediately: bool | None = None) -> Any:
    """The DAG as the scheduler holds it: serialized as the dag processor stores it (through JSON,
    as in the database) and read back; its timetable is what the registered plugin deserializes.
    With `stock_run_immediately` (True or False), the stored form names Airflow's own
    CronTriggerTimetable with that run_immediately instead: what this DAG's schedule was before."""
    import json

    from airflow.serialization.serialized_objects import DagSerialization

    stored = json.dumps(DagSerialization.to_dict(dag))
    if stock_run_immediately is not None:
        ours = ('{"__type": "retrain_schedule.OnTimeCronTimetable", "__var": {"expression": "0 0 * * 0", '
                '"timezone": "UTC", "grace_s": 600.0}}')
        assert stored.count(ours) == 1, stored
        stock = {"__type": "airflow.timetables.trigger.CronTriggerTimetable",
                 "__var": {"expression": "0 0 * * 0", "timezone": "UTC", "interval": 0.0,
                           "run_immediately": stock_run_immediately}}
        stored = stored.replace(ours, json.dumps(stock))
    return DagSerialization.from_dict(json.loads(stored))


def _next_run_at(serdag: Any, now: str, monkeypatch: pytest.MonkeyPatch, last_run_end: str | None = None) -> Any:
    """When the scheduler's next scheduled run of `serdag` starts, computed at `now` (UTC) as the dag
    processor does on every parse, paused or not (DagModel.calculate_dagrun_date_fields), the last
    scheduled run's data interval ending at `last_run_end` (None: no scheduled run yet; manual runs
    do not count)."""
    import airflow.timetables.trigger as trigger
    from airflow._shared.timezones.timezone import parse
    from airflow.timetables.base import DagRunInfo

    monkeypatch.setattr(trigger, "utcnow", lambda: parse(now))  # the clock the timetables read
    last = None if last_run_end is None else DagRunInfo.interval(parse(last_run_end), parse(last_run_end))
    info = serdag.next_dagrun_info(last_automated_run_info=last)  # the DAG's own restriction: catchup=False
    assert info is not None
    return info.run_after


def test_the_schedule_round_trips_through_serialization(dag: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The dag processor stores the DAG serialized and the scheduler reads it back: the timetable
    comes back as our class (found through the plugin that registers it), same cron, grace and
    run_immediately, and reads as such in the UI (the DAG list's schedule, its tooltip)."""
    from airflow import plugins_manager
    from airflow._shared.timezones.timezone import parse
    from airflow.timetables.assets import AssetOrTimeSchedule

    assert plugins_manager.get_import_errors() == {}
    assert "retrain_schedule.OnTimeCronTimetable" in plugins_manager.get_timetables_plugins()
    schedule = _scheduler_dag(dag).timetable
    assert isinstance(schedule, AssetOrTimeSchedule)  # the scheduler-side class: new data or the time
    t = schedule.timetable
    assert type(t) is plugins_manager.get_timetables_plugins()["retrain_schedule.OnTimeCronTimetable"]
    assert (t.summary, t.grace, t._run_immediately) == ("0 0 * * 0 (missed times skipped)",
                                                         timedelta(minutes=10), timedelta(0))
    assert schedule.summary == "Asset or 0 0 * * 0 (missed times skipped)"
    assert schedule.description == ("Triggered by assets or At 00:00, only on Sunday (UTC); a time missed by "
                                    "more than 10 minutes (paused, or Airflow down) is skipped, not run late")
    assert t.serialize() == type(t).deserialize(t.serialize()).serialize()
    monkeypatch.setattr("airflow.timetables.trigger.utcnow", lambda: parse("2026-12-09T12:00:00+00:00"))
    assert t.infer_manual_data_interval(run_after=parse("2026-12-09T12:00:00+00:00")).end.isoformat() \
        == "2026-12-09T12:00:00+00:00"  # a manual trigger runs now


# 2026-11-22, 11-29, 12-06 and 12-13 are Sundays; the schedule is the e2e profile's @weekly (Sunday
# 00:00 UTC). The scheduler creates a run once its run_after has passed, so a run_after before `now`
# starts at once.
@pytest.mark.parametrize(("now", "first"), [
    ("2026-12-06T00:00:00+00:00", "2026-12-06T00:00:00+00:00"),  # unpaused at the very slot: due then
    ("2026-12-06T00:00:30+00:00", "2026-12-13T00:00:00+00:00"),  # just after Sunday 00:00
    ("2026-12-06T14:38:00+00:00", "2026-12-13T00:00:00+00:00"),  # issue 30's case (False queued 12-06)
    ("2026-12-09T12:00:00+00:00", "2026-12-13T00:00:00+00:00"),  # mid-week
    ("2026-12-12T23:59:30+00:00", "2026-12-13T00:00:00+00:00"),  # just before Sunday 00:00: due after
])
def test_unpausing_runs_nothing_due_before_it(dag: Any, monkeypatch: pytest.MonkeyPatch, now: str,
                                              first: str) -> None:
    """With no scheduled run yet (a new DAG; `make demo`'s runs are manual), unpausing, with the
    toggle or the trigger form's "Unpause on trigger", schedules the first slot at or after the
    unpause, never an earlier one."""
    from airflow._shared.timezones.timezone import parse

    run_after = _next_run_at(_scheduler_dag(dag), now, monkeypatch)
    assert run_after == parse(first) and run_after >= parse(now)


@pytest.mark.parametrize(("last_run_end", "now", "expected"), [
    # one missed Sunday (12-06; paused after the 11-29 run), unpaused...
    ("2026-11-29T00:00:00+00:00", "2026-12-06T14:38:00+00:00", "2026-12-13T00:00:00+00:00"),  # Sunday 14:38
    ("2026-11-29T00:00:00+00:00", "2026-12-09T12:00:00+00:00", "2026-12-13T00:00:00+00:00"),  # Wednesday
    ("2026-11-29T00:00:00+00:00", "2026-12-06T00:10:01+00:00", "2026-12-13T00:00:00+00:00"),  # just past the grace
    ("2026-11-29T00:00:00+00:00", "2026-12-12T23:59:30+00:00", "2026-12-13T00:00:00+00:00"),  # Saturday night
    # two missed Sundays (11-29 and 12-06; paused after the 11-22 run)
    ("2026-11-22T00:00:00+00:00", "2026-12-06T14:38:00+00:00", "2026-12-13T00:00:00+00:00"),
    ("2026-11-22T00:00:00+00:00", "2026-12-09T12:00:00+00:00", "2026-12-13T00:00:00+00:00"),
    ("2026-11-22T00:00:00+00:00", "2026-12-06T00:10:01+00:00", "2026-12-13T00:00:00+00:00"),
    # within the grace after the slot: that slot, once (the scheduler's own path: due seconds ago)
    ("2026-11-29T00:00:00+00:00", "2026-12-06T00:00:00+00:00", "2026-12-06T00:00:00+00:00"),
    ("2026-11-29T00:00:00+00:00", "2026-12-06T00:00:20+00:00", "2026-12-06T00:00:00+00:00"),
    ("2026-11-29T00:00:00+00:00", "2026-12-06T00:10:00+00:00", "2026-12-06T00:00:00+00:00"),
    ("2026-11-22T00:00:00+00:00", "2026-12-06T00:05:00+00:00", "2026-12-06T00:00:00+00:00"),  # 11-29 never
    # nothing missed (paused after the 12-06 run): the next Sunday, as for a new DAG
    ("2026-12-06T00:00:00+00:00", "2026-12-06T00:00:20+00:00", "2026-12-13T00:00:00+00:00"),
    ("2026-12-06T00:00:00+00:00", "2026-12-09T12:00:00+00:00", "2026-12-13T00:00:00+00:00"),
    ("2026-11-29T00:00:00+00:00", "2026-12-05T23:59:50+00:00", "2026-12-06T00:00:00+00:00"),
])
def test_unpausing_after_scheduled_runs_skips_the_missed_slots(
        dag: Any, monkeypatch: pytest.MonkeyPatch, last_run_end: str, now: str, expected: str) -> None:
    """What docs/configuration.md says of a pause between scheduled runs: a Sunday the scheduler
    reaches more than 10 minutes late (paused across it) never runs; the next Sunday runs on time.
    One reached within the 10 minutes runs then, once."""
    run_after = _next_run_at(_scheduler_dag(dag), now, monkeypatch, last_run_end=last_run_end)
    assert run_after.isoformat() == expected


@pytest.mark.parametrize(("stock_run_immediately", "last_run_end", "now", "stale"), [
    # the first unpause, issue 30: run_immediately=False reads like None (10 % of a week: 16.8 h)
    (False, None, "2026-12-06T14:38:00+00:00", "2026-12-06T00:00:00+00:00"),
    # after scheduled runs (run_immediately plays no part): the latest missed slot at once
    (False, "2026-11-29T00:00:00+00:00", "2026-12-09T12:00:00+00:00", "2026-12-06T00:00:00+00:00"),
    (True, "2026-11-22T00:00:00+00:00", "2026-12-09T12:00:00+00:00", "2026-12-06T00:00:00+00:00"),
])
def test_airflows_own_timetable_would_run_a_missed_slot_at_once(
        dag: Any, monkeypatch: pytest.MonkeyPatch, stock_run_immediately: bool, last_run_end: str | None,
        now: str, stale: str) -> None:
    """Why the schedule is a timetable of our own: where ours waits for the next Sunday, Airflow's
    CronTriggerTimetable (catchup=False) starts a slot days or hours old at the unpause."""
    ours = _next_run_at(_scheduler_dag(dag), now, monkeypatch, last_run_end=last_run_end)
    assert ours.isoformat() == "2026-12-13T00:00:00+00:00"
    stock = _next_run_at(_scheduler_dag(dag, stock_run_immediately=stock_run_immediately), now, monkeypatch,
                         last_run_end=last_run_end)
    assert stock.isoformat() == stale


def test_a_backfill_still_lists_every_missed_slot(dag: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """catchup=True (a backfill asked for by hand, `airflow backfill create`) is Airflow's rule
    unchanged: each Sunday of the range, however long ago."""
    import airflow.timetables.trigger as trigger
    from airflow._shared.timezones.timezone import parse
    from airflow.timetables.base import DagRunInfo, TimeRestriction

    monkeypatch.setattr(trigger, "utcnow", lambda: parse("2026-12-09T12:00:00+00:00"))
    serdag = _scheduler_dag(dag)
    infos = serdag.iter_dagrun_infos_between(parse("2026-11-20T00:00:00+00:00"), parse("2026-12-09T12:00:00+00:00"))
    assert [i.run_after.isoformat()[:10] for i in infos] == ["2026-11-22", "2026-11-29", "2026-12-06"]
    after = serdag.timetable.next_dagrun_info_v2(
        last_dagrun_info=DagRunInfo.interval(parse("2026-11-22T00:00:00+00:00"), parse("2026-11-22T00:00:00+00:00")),
        restriction=TimeRestriction(earliest=None, latest=None, catchup=True))
    assert after.run_after.isoformat() == "2026-11-29T00:00:00+00:00"


def test_params_form_covers_the_knobs(dag: Any) -> None:
    params = dag.params
    assert set(PARAM_PATHS) | {"profile", "force"} == set(params.keys())
    profile = params.get_param("profile")
    assert profile.value == "e2e"  # $RETRAIN_PROFILE, set by conftest
    assert set(profile.schema["enum"]) == set(available_profiles())
    lr = params.get_param("learning_rate")
    assert lr.value is None and lr.schema["type"] == ["null", "number"]


def test_params_descriptions_and_bounds_come_from_the_config_fields(dag: Any) -> None:
    from ml.config import TrainConfig

    lr, r = dag.params.get_param("learning_rate"), dag.params.get_param("lora_r")
    assert lr.schema["description_md"].startswith(TrainConfig.model_fields["learning_rate"].description)
    assert lr.schema["allOf"] == [{"exclusiveMinimum": 0, "maximum": 1}]  # a rate of 0 trains nothing
    assert r.schema["allOf"][0]["exclusiveMinimum"] == 0
    assert dag.params.get_param("max_steps").schema["allOf"] == [{"minimum": -1, "maximum": 1_000_000,
                                                                   "not": {"const": 0}}]
    for name, dotted in PARAM_PATHS.items():
        schema = dag.params.get_param(name).schema
        assert schema["description_md"].startswith(field_schema(dotted)["description"]), name
        # Airflow's number field clamps into a top-level minimum/maximum silently (-1 became 0)
        assert not {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"} & set(schema), name


def test_empty_fields_say_which_value_each_profile_runs(dag: Any) -> None:
    from ml.config import load_config

    steps = dag.params.get_param("max_steps").schema["description_md"]
    assert f"demo `{load_config('demo').train.max_steps}`" in steps
    assert f"pubmedqa-ko-llama31-8b `{load_config('pubmedqa-ko-llama31-8b').train.max_steps}`" in steps
    rank = dag.params.get_param("lora_r").schema["description_md"]
    assert "Empty: the profile's value, `16` in every profile." in rank


REFUSED = [("learning_rate", -1), ("learning_rate", 0), ("learning_rate", 5), ("learning_rate", "abc"),
           ("max_steps", 0), ("max_steps", -2), ("max_steps", 1.5), ("max_steps", "abc"), ("max_steps", 2_000_000),
           ("num_train_epochs", 0), ("lora_r", 0), ("lora_r", 2.5), ("lora_r", 4096), ("lora_alpha", -16),
           ("min_delta", -0.1), ("min_delta", 2), ("approval", "maybe")]


@pytest.mark.parametrize(("param", "value"), REFUSED)
def test_the_form_refuses_what_the_config_refuses(dag: Any, param: str, value: Any) -> None:
    """The schema the UI's form is rendered from, as the API server reads it back (serialized), refuses
    the value on trigger, naming the field; the config refuses the same value."""
    from airflow.exceptions import ParamValidationError
    from airflow.serialization.serialized_objects import DagSerialization

    served = DagSerialization.from_dict(DagSerialization.to_dict(dag))
    with pytest.raises(ParamValidationError, match=f"Invalid input for param {param}:"):
        served.params.deep_merge({"profile": "demo", param: value}).validate()
    with pytest.raises(ConfigError, match=PARAM_PATHS[param]):
        config_from_params({"profile": "demo", param: value})


@pytest.mark.parametrize(("param", "value"), [("learning_rate", 1e-9), ("learning_rate", 1), ("max_steps", -1),
                                              ("max_steps", 1), ("lora_r", 1024), ("min_delta", 0),
                                              ("approval", None), ("max_steps", None)])
def test_the_form_takes_every_value_the_config_takes(dag: Any, param: str, value: Any) -> None:
    from airflow.serialization.serialized_objects import DagSerialization

    served = DagSerialization.from_dict(DagSerialization.to_dict(dag))
    assert served.params.deep_merge({"profile": "demo", param: value}).validate()[param] == value
    config_from_params({"profile": "demo", param: value})


def test_tasks_are_thin_and_import_nothing_heavy_at_parse_time() -> None:
    import subprocess
    import sys

    code = ("import sys; sys.path.insert(0, 'dags'); import retrain_lora; "
            "heavy = [m for m in ('torch', 'transformers', 'mlflow', 'trl', 'peft') if m in sys.modules]; "
            "print(heavy); sys.exit(1 if heavy else 0)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_a_task_imports_only_the_stack_its_step_needs() -> None:
    """Each task is a process of its own: importing ml.pipeline must not pull the whole ML stack."""
    assert imports_of("import ml.pipeline", ("torch", "transformers", "mlflow", "great_expectations", "trl")) == []


def test_every_task_and_the_run_are_time_bounded(dag: Any) -> None:
    from ml.config import load_config

    cap = timedelta(hours=load_config("e2e").deploy.train_timeout_cap_h)
    limits = {t.task_id: t.execution_timeout for t in dag.tasks}
    assert all(limit is not None and limit > timedelta(0) for limit in limits.values()), limits
    assert cap < limits["train"] <= cap + timedelta(minutes=30)  # the trainer's own limit comes first
    # the run outlasts its long steps back to back, and ends
    assert dag.dagrun_timeout is not None
    wait = timedelta(hours=load_config("e2e").registry.approval_timeout_h)  # a person's approval, where asked
    assert limits["train"] + limits["evaluate"] + limits["promote_champion"] + wait < dag.dagrun_timeout
    assert dag.dagrun_timeout < timedelta(days=2) + wait
    registry_tasks = ("register", "promote_champion", "keep_champion")
    assert all(dag.get_task(t).retries >= 2 and dag.get_task(t).retry_exponential_backoff for t in registry_tasks)
    assert all(dag.get_task(t).pool == "mlflow_registry" for t in registry_tasks)


def test_what_the_form_cannot_say_fails_the_first_task_with_one_line(dag: Any, capfd: Any, caplog: Any) -> None:
    """A path outside `form_roots` passes the schema (a string): `load` refuses it with the config's one
    line, as a failure of its own (no retry), whose only traceback is Airflow's task runner: no frame of
    ml/ or pydantic; nothing after it runs."""
    from airflow.dag_processing.dagbag import DagBag

    # a DAG of its own: dag.test() leaves its run_conf in the DAG's params, which later tests share
    own = DagBag(dag_folder=str(ROOT / "dags")).get_dag("retrain_lora")
    run = own.test(run_conf={"profile": "e2e", "dataset": "/etc/hostname"})
    states = {ti.task_id: ti.state for ti in run.get_task_instances()}
    assert run.state == "failed" and states["load"] == "failed"
    assert all(state in ("upstream_failed", "skipped") for task, state in states.items() if task != "load"), states
    why = "AirflowFailException: dataset '/etc/hostname' is outside the folders the trigger form may read"
    assert f"Why: {why}" in caplog.text  # the failure notification: one line
    out = capfd.readouterr()
    trace = (out.out + out.err).split("Task failed with exception", 1)[1].split("::group::Post Execute", 1)[0]
    assert why in trace and "/ml/" not in trace and "pydantic" not in trace, trace
