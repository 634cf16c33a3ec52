"""Airflow UI plugin: links from Airflow to MLflow.

- Navigation links to the MLflow registry and experiments.
- Extra links on a task ("MLflow run", "MLflow model version"): the register task pushes the URLs
  of the run and the version it wrote as XComs (`mlflow_run_url`, `mlflow_version_url`), and the
  buttons open them; on other tasks they stay empty. (The other way, each version's review card
  links to the Airflow run and its task logs.)

The URL is the one people open in a browser (MLFLOW_UI_URL), which may differ from the tracking
URI the workers use inside a network. Every link asks for MLflow's classic machine-learning view
(`ML_VIEW`): MLflow 3.17's UI opens an experiment, a run and the sidebar in the view of its
workflow switch, taken from the link's `workflowType` or else from the browser's last choice, and
GenAI by default (an empty traces dashboard, no runs table, no "Model registry" in the sidebar);
it does not read the experiment's own kind tag (ml/tracking.py sets it all the same).
"""

from __future__ import annotations

import os

from airflow.plugins_manager import AirflowPlugin

# Airflow's own link that reads a task's XCom (what a deserialised operator's links are); the API
# server evaluates global links, with the metadata database at hand.
from airflow.serialization.definitions.operatorlink import XComOperatorLink

MLFLOW_UI_URL = os.environ.get("MLFLOW_UI_URL", "http://127.0.0.1:5000").rstrip("/")
RUN_URL_KEY, VERSION_URL_KEY = "mlflow_run_url", "mlflow_version_url"
ML_VIEW = "workflowType=machine_learning"


def ui_url(route: str) -> str:
    """A page of MLflow's UI (`route`: its hash route, e.g. `/models`) in the classic ML view."""
    return f"{MLFLOW_UI_URL}/#{route}?{ML_VIEW}"


def run_url(run_id: str) -> str:
    return ui_url(f"/runs/{run_id}")  # MLflow's UI finds the experiment itself


def version_url(model_name: str, version: str) -> str:
    return ui_url(f"/models/{model_name}/versions/{version}")


class MlflowLinksPlugin(AirflowPlugin):
    name = "mlflow_links"
    external_views = [
        {"name": "MLflow model registry", "href": ui_url("/models"), "destination": "nav",
         "category": "browse"},
        {"name": "MLflow experiments", "href": ui_url("/experiments"), "destination": "nav",
         "category": "browse"},
    ]
    global_operator_extra_links = [XComOperatorLink(name="MLflow run", xcom_key=RUN_URL_KEY),
                                   XComOperatorLink(name="MLflow model version", xcom_key=VERSION_URL_KEY)]
