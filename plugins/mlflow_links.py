"""Airflow UI plugin: a navigation link to the MLflow registry where versions are reviewed.

The URL is the one people open in a browser (MLFLOW_UI_URL), which may differ
from the tracking URI the workers use inside a network.
"""

from __future__ import annotations

import os

from airflow.plugins_manager import AirflowPlugin

MLFLOW_UI_URL = os.environ.get("MLFLOW_UI_URL", "http://127.0.0.1:5000").rstrip("/")


class MlflowLinksPlugin(AirflowPlugin):
    name = "mlflow_links"
    external_views = [
        {"name": "MLflow model registry", "href": f"{MLFLOW_UI_URL}/#/models", "destination": "nav",
         "category": "browse"},
        {"name": "MLflow experiments", "href": f"{MLFLOW_UI_URL}/#/experiments", "destination": "nav",
         "category": "browse"},
    ]
