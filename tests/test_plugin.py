"""The Airflow plugin as Airflow's plugin manager loads it from plugins/."""

from __future__ import annotations

from pathlib import Path


def test_plugin_registers_links_to_the_mlflow_ui() -> None:
    from airflow import plugins_manager

    assert plugins_manager.get_import_errors() == {}
    info = {p["name"]: p for p in plugins_manager.get_plugin_info()}
    assert "mlflow_links" in info
    views = info["mlflow_links"]["external_views"]
    assert {v["name"] for v in views} == {"MLflow model registry", "MLflow experiments"}
    assert all(v["href"].startswith("http") and v["destination"] == "nav" for v in views)


def test_every_link_to_mlflow_opens_its_classic_ml_view() -> None:
    """MLflow 3.17's UI takes its view from the link's `workflowType` (else the browser's last choice,
    GenAI by default): every link the product makes carries it, and the installed UI still reads it."""
    import re

    import mlflow
    from mlflow_links import MLFLOW_UI_URL, MlflowLinksPlugin, run_url, version_url
    from retrain_notifications import decision_message  # noqa: F401  (builds its link with version_url)

    assert run_url("abc") == f"{MLFLOW_UI_URL}/#/runs/abc?workflowType=machine_learning"
    assert version_url("m", "3") == f"{MLFLOW_UI_URL}/#/models/m/versions/3?workflowType=machine_learning"
    assert all(v["href"].endswith("?workflowType=machine_learning") for v in MlflowLinksPlugin.external_views)
    bundle = "".join(p.read_text(encoding="utf-8", errors="ignore") for p in
                     (Path(mlflow.__file__).parent / "server/js/build/static/js").glob("main.*.js"))
    assert re.search(r'\.get\("workflowType"\)', bundle) and 'MACHINE_LEARNING="machine_learning"' in bundle


NOTE_DAGS = """
from airflow.sdk import dag, get_current_context, task
from run_notes import RUN_NOTE_KEY, note_line


@dag(dag_id="note_ok", schedule=None)
def note_ok():
    @task
    def decide():
        get_current_context()["ti"].xcom_push(key=RUN_NOTE_KEY, value=note_line("promoted v2", "better\\nmore"))

    decide()


@dag(dag_id="note_failed", schedule=None)
def note_failed():
    @task
    def boom():
        raise RuntimeError("no")

    boom()


note_ok()
note_failed()
"""


def test_a_finished_runs_note_is_the_line_its_tasks_pushed(airflow_db: None, tmp_path: Path) -> None:
    """The listener (plugins/run_notes.py) as Airflow fires it when a run ends, here through dag.test():
    the pushed line on a run that succeeds; on a failed run without one, where it failed."""
    from airflow.dag_processing.bundles.manager import DagBundlesManager
    from airflow.dag_processing.dagbag import DagBag, sync_bag_to_db
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session

    (tmp_path / "note_dags.py").write_text(NOTE_DAGS)
    bag = DagBag(dag_folder=str(tmp_path))
    assert bag.import_errors == {}
    DagBundlesManager().sync_bundles_to_db()
    sync_bag_to_db(bag, "dags-folder", None)  # serialized, as dag.test() needs them
    ok, failed = bag.get_dag("note_ok").test(), bag.get_dag("note_failed").test()
    assert (ok.state, failed.state) == ("success", "failed")
    with create_session() as session:
        notes = {r.dag_id: r.note for r in session.query(DagRun).filter(DagRun.run_id.in_([ok.run_id, failed.run_id]))}
    assert notes == {"note_ok": "promoted v2: better", "note_failed": "failed at boom"}
