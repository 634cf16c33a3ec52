"""Retrain a LoRA adapter on fresh data and promote it only when it is measurably better.

load -> preflight -> validate (data-quality gate) -> prepare -> train -> evaluate -> register
-> promote_or_keep -> promote_champion | keep_champion -> summary

`preflight` fails the run before any GPU time when MLflow cannot be reached or written to, and
skips the rest when the data and the training settings equal the champion's (trigger with
force=true to train anyway). The run's config is frozen by its first task. Registry writes
take the `mlflow_registry` pool (one slot), and promotion re-checks @champion under a lock.

Each task calls its `ml.pipeline` step; the work lives in `ml/` and runs without
Airflow (`python -m ml --help`). Tasks of one run share a run folder under the
profile's `output_dir`, named after the Airflow run id. The schedule, the GPU queue, the
train task's retries and its time cap are the default profile's `deploy` settings
($RETRAIN_PROFILE), read when this file is parsed: a run's own profile cannot change them.

Trigger with parameters from the UI ("Trigger DAG" shows a form): an empty
field keeps the profile's value (each field's description lists it per profile); a value the config
refuses is refused by the form, and what its schema cannot say (a path outside `form_roots`) fails
the first task with one line.

Paused when created (Airflow's default). Unpausing it (with the toggle, or by a trigger with
"Unpause on trigger") starts no scheduled run that was due before, first unpause or not: the next
scheduled run is the profile's next scheduled time after the unpause (`@weekly`: the next Sunday
00:00 UTC); a manual trigger runs now. A scheduled time runs only when the scheduler reaches it
within 10 minutes; one missed by more (paused across it, or Airflow down) is skipped, never run
late (plugins/retrain_schedule.py). Once scheduled runs exist, an unpause within 10 minutes after a
scheduled time runs that time's run then.

New data starts a run too, before the schedule's time: the profile's dataset is an Airflow Asset
(`file:///...` for a local file, `hf://datasets/<id>` for the hub), and an asset event for it
(from a producing DAG's task with `outlets=[Asset("<uri>")]`, or `POST /api/v2/assets/events`)
queues a run. A run whose data and config equal the champion's is skipped at preflight.
"""

from __future__ import annotations

import os
from dataclasses import asdict
from datetime import timedelta
from typing import Any

from airflow.sdk import (
    Asset,
    AssetOrTimeSchedule,
    Param,
    TriggerRule,
    dag,
    get_current_context,
    task,
)
from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException
from mlflow_links import RUN_URL_KEY, VERSION_URL_KEY, run_url, version_url  # plugins/: links to MLflow
from retrain_approval import ApprovalGate, Ask  # plugins/: a person's approval, human-in-the-loop
from retrain_notifications import RetrainNotifier  # plugins/: who is told, through Airflow connections
from retrain_schedule import OnTimeCronTimetable  # plugins/: the schedule, no missed time run late
from run_notes import RUN_NOTE_KEY, note_line  # plugins/: the run's note, set when it ends

# Only light modules at parse time; each step imports the ML stack it runs.
from ml import pipeline
from ml.config import DEFAULT_PROFILE, available_profiles, load_config
from ml.errors import ConfigError, ExportFailed, GateFailed
from ml.params import config_from_params, field_schema, param_schemas
from ml.runs import run_paths

DAG_ID = "retrain_lora"
OUTCOME_WORDS = {"promote": "promoted", "keep": "kept the champion", "needs_review": "needs review"}  # run notes
REGISTRY_POOL = "mlflow_registry"  # one slot: registry writes of concurrent runs one at a time

DEFAULT = load_config(os.environ.get("RETRAIN_PROFILE") or DEFAULT_PROFILE)

# Bounds, so that a run nobody watches ends: most steps take seconds to minutes; the trainer stops
# itself at its own limit (steps x train.timeout_per_step_s + startup, at most the deploy cap), before
# the task's cap; evaluation and promotion (which may score again) load models.
SHORT = timedelta(minutes=30)
MODEL_WORK = timedelta(hours=2)
TRAIN_CAP = timedelta(hours=DEFAULT.deploy.train_timeout_cap_h) + timedelta(minutes=10)
# A person's approval, where a run asks for one, waits this long at most (each run's own
# registry.approval_timeout_h sets its wait; the run's time limit allows the default profile's).
APPROVAL_WAIT = timedelta(hours=DEFAULT.registry.approval_timeout_h)
# Registry steps are idempotent (a retry finds what its attempt wrote); a server that is briefly
# away gets a few tries, further apart each time.
REGISTRY_RETRIES: dict[str, Any] = {"retries": 3, "retry_delay": timedelta(seconds=20),
                                    "retry_exponential_backoff": True, "max_retry_delay": timedelta(minutes=5)}


def _param(default: Any, schema: dict[str, Any]) -> Param:
    """A form field from a config field's JSON schema. Its description goes in as `description_md`,
    which the form renders as markdown (the descriptions quote `names`), a plain one as text."""
    schema = dict(schema)
    return Param(default, description_md=schema.pop("description"), **schema)


PARAMS = {
    "profile": _param(DEFAULT.profile, {**field_schema("profile"), "enum": available_profiles()}),
    **{name: _param(None, schema) for name, schema in param_schemas().items()},
    "force": Param(False, type="boolean", description_md=(
        "Train even when the data and the training settings equal the champion's (otherwise the run skips).")),
}


def _run(first: bool = False) -> tuple[Any, Any, str]:
    """This run's typed config, run folder and key: the first task freezes the config built from the
    Params in the run folder; every later task reads that copy (a profile edited mid-run changes nothing)."""
    ctx = get_current_context()
    try:
        cfg = config_from_params(dict(ctx["params"]))
    except ConfigError as exc:  # what the form's schema cannot say (a path outside form_roots): one line
        raise AirflowFailException(str(exc)) from None
    run_key = f"{DAG_ID}__{ctx['run_id']}"
    paths = run_paths(cfg, run_key)
    return pipeline.freeze(cfg, paths, first), paths, run_key


def _route(context: Any) -> tuple[str | None, Ask | None]:
    """promote_or_keep: the rule's branch, or, where the run asks for a person's approval and the
    rule says promote, the request: the version's review card and its MLflow links."""
    cfg, paths, _ = _run()
    if pipeline.final_decision(paths)["outcome"] != "promote":
        return "keep_champion", None
    if cfg.registry.approval != "required":
        return "promote_champion", None
    req, reg = pipeline.approval_request(paths), cfg.registry
    links = (f"[MLflow model version]({version_url(reg.model_name, req['version'])}) · "
             f"[MLflow run]({run_url(req['run_id'])})")
    return None, Ask(f"Promote {reg.model_name} v{req['version']} to @{reg.champion_alias}?",
                     f"{req['card']}\n{links}\n", timedelta(hours=reg.approval_timeout_h))


def _answered(context: Any, answer: Any) -> None:
    _, paths, _ = _run()
    pipeline.record_review(paths, dict(answer))  # promote_champion or keep_champion applies it


# The profile's dataset as an Airflow Asset: a run starts when an upstream job announces new data.
DATASET = Asset(DEFAULT.data.uri)


def _schedule(cron: str | None) -> AssetOrTimeSchedule | list[Asset]:
    """The profile's schedule or new data, whichever comes first (no schedule: new data only).
    The time part runs a scheduled time only when the scheduler reaches it within 10 minutes
    (plugins/retrain_schedule.py): unpausing the DAG, the first time or after a pause across
    scheduled times, never starts a retrain that was due longer ago (on the GPU, with nobody
    expecting it)."""
    if cron is None:
        return [DATASET]
    return AssetOrTimeSchedule(timetable=OnTimeCronTimetable(cron, timezone="UTC"), assets=[DATASET])


@dag(
    dag_id=DAG_ID,
    schedule=_schedule(DEFAULT.deploy.schedule),
    catchup=False,
    max_active_runs=1,
    params=PARAMS,
    tags=["llm", "lora", "mlflow"],
    doc_md=__doc__,
    default_args={"retries": 0, "execution_timeout": SHORT, "on_failure_callback": RetrainNotifier("failure")},
    dagrun_timeout=TRAIN_CAP + 2 * MODEL_WORK + 6 * SHORT + APPROVAL_WAIT,
)
def retrain_lora() -> None:
    @task
    def load() -> dict[str, Any]:
        cfg, paths, _ = _run(first=True)
        return asdict(pipeline.load(cfg, paths))

    @task(on_skipped_callback=RetrainNotifier("decision"))  # skipped: nothing changed, and people are told
    def preflight(snapshot: dict[str, Any]) -> dict[str, Any]:
        cfg, paths, run_key = _run()
        ctx = get_current_context()
        reason = pipeline.preflight(cfg, paths, run_key, force=bool(ctx["params"].get("force")))
        if reason:
            ctx["ti"].xcom_push(key="skipped", value=reason)  # for the notification
            ctx["ti"].xcom_push(key=RUN_NOTE_KEY, value=note_line("skipped", reason))
            raise AirflowSkipException(reason)
        return snapshot

    @task
    def validate(snapshot: dict[str, Any]) -> dict[str, Any]:
        cfg, paths, run_key = _run()
        try:
            return pipeline.validate(cfg, paths, run_key)
        except GateFailed as exc:  # no retry can fix bad data
            get_current_context()["ti"].xcom_push(key=RUN_NOTE_KEY, value=note_line("gate failed", str(exc)))
            raise AirflowFailException(str(exc)) from None  # its lines once, not again as the cause

    @task
    def prepare(gate: dict[str, Any]) -> dict[str, int]:
        cfg, paths, _ = _run()
        return pipeline.prepare(cfg, paths)

    # The GPU steps go to the CUDA worker's queue; the trainer runs as a child process there
    # and checkpoints, so a retry resumes where a killed attempt stopped.
    @task(queue=DEFAULT.deploy.gpu_queue, retries=DEFAULT.deploy.train_retries, retry_delay=timedelta(seconds=30),
          execution_timeout=TRAIN_CAP)
    def train(splits: dict[str, int]) -> dict[str, Any]:
        cfg, paths, run_key = _run()
        ti = get_current_context()["ti"]  # its "MLflow run" button opens the run while it trains
        return pipeline.train(cfg, paths, run_key, opened=lambda run_id: ti.xcom_push(key=RUN_URL_KEY,
                                                                                      value=run_url(run_id)))

    @task(queue=DEFAULT.deploy.gpu_queue, execution_timeout=MODEL_WORK)
    def evaluate(trained: dict[str, Any]) -> dict[str, Any]:
        cfg, paths, _ = _run()
        return pipeline.evaluate(cfg, paths)

    @task(pool=REGISTRY_POOL, **REGISTRY_RETRIES)
    def register(evaluation: dict[str, Any]) -> dict[str, str]:
        cfg, paths, run_key = _run()
        ctx = get_current_context()
        run_id, airflow_run = str(ctx["run_id"]), ctx["ti"].log_url.split("/tasks/")[0]  # with [api] base_url
        links = {"Airflow run": airflow_run, "train task log": f"{airflow_run}/tasks/train",
                 "evaluate task log": f"{airflow_run}/tasks/evaluate"}
        registered = pipeline.register(cfg, paths, run_key, tags={"airflow.dag_id": DAG_ID, "airflow.run_id": run_id},
                                       links=links)
        # the task's "MLflow run" and "MLflow model version" buttons (plugins/mlflow_links.py)
        ctx["ti"].xcom_push(key=RUN_URL_KEY, value=run_url(registered["run_id"]))
        ctx["ti"].xcom_push(key=VERSION_URL_KEY, value=version_url(cfg.registry.model_name, registered["version"]))
        return registered

    # The rule's branch; where a run asks for approval, a person's answer (Required Actions), waited
    # for without holding a worker slot.
    promote_or_keep = ApprovalGate(task_id="promote_or_keep", route=_route, answered=_answered,
                                   promote_task="promote_champion", keep_task="keep_champion",
                                   notifiers=[RetrainNotifier("approval")], response_timeout=APPROVAL_WAIT)

    # On the GPU queue: if @champion moved since evaluation, promotion scores the challenger again.
    @task(pool=REGISTRY_POOL, queue=DEFAULT.deploy.gpu_queue, execution_timeout=MODEL_WORK, **REGISTRY_RETRIES)
    def promote_champion() -> dict[str, Any]:
        cfg, paths, run_key = _run()
        try:
            return pipeline.promote(cfg, paths, run_key)  # moves @champion, keeps @previous_champion
        except ExportFailed as exc:  # registry.require_export and a merged model that is not the adapter's
            raise AirflowFailException(str(exc)) from None  # a retry would merge the same again

    @task(pool=REGISTRY_POOL, **REGISTRY_RETRIES)
    def keep_champion() -> dict[str, Any]:
        cfg, paths, _ = _run()
        return pipeline.keep(cfg, paths)  # tags the version rejected or needs_review; the aliases stay

    @task(trigger_rule=TriggerRule.NONE_FAILED_MIN_ONE_SUCCESS, on_success_callback=RetrainNotifier("decision"))
    def summary(snapshot: dict[str, Any], evaluation: dict[str, Any], registered: dict[str, str]) -> dict[str, Any]:
        cfg, paths, _ = _run()
        decision = pipeline.final_decision(paths)
        print(f"data {snapshot['fingerprint'][:12]} ({snapshot['rows']} rows) | run {registered['run_id']} | "
              f"version {registered['version']} | {decision['reason']}")
        for line in decision["guardrail_lines"]:
            print(line)
        get_current_context()["ti"].xcom_push(key=RUN_NOTE_KEY, value=note_line(
            f"{OUTCOME_WORDS.get(decision['outcome'], decision['outcome'])} v{registered['version']}",
            decision["reason"]))
        return {**{k: decision[k] for k in ("outcome", "reason", "challenger_loss", "baseline_loss", "baseline")},
                "guardrails": decision["guardrail_lines"],
                "model_name": cfg.registry.model_name,
                "version": registered["version"], "run_id": registered["run_id"], "data_source": snapshot["source"],
                "rows": snapshot["rows"], "fingerprint": snapshot["fingerprint"]}

    checked = preflight(load())  # skipped: so is everything after it, the summary included
    evaluation = evaluate(train(prepare(validate(checked))))
    registered = register(evaluation)
    [evaluation, registered] >> promote_or_keep
    promote_or_keep >> [promote_champion(), keep_champion()] >> summary(checked, evaluation, registered)


dag = retrain_lora()
