"""The pipeline's MLflow account: created, or its password set again, by the admin (mlflow-init).

Airflow's tasks log in to MLflow as this user, not as the admin. With `default_permission =
NO_PERMISSIONS` a user may create experiments and registered models and gets MANAGE on what it
creates, and nothing else: the pipeline owns its profiles' experiments and models, and people
(the admin, or users the admin grants READ) review them. Credentials come from the environment.
"""

from __future__ import annotations

import os
import time
import urllib.request

from mlflow.exceptions import MlflowException
from mlflow.server import get_app_client


def _wait_healthy(uri: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(2)


def main() -> None:
    uri = os.environ["MLFLOW_TRACKING_URI"].rstrip("/")
    user, password = os.environ["MLFLOW_PIPELINE_USERNAME"], os.environ["MLFLOW_PIPELINE_PASSWORD"]
    if user == os.environ.get("MLFLOW_TRACKING_USERNAME"):
        raise SystemExit("MLFLOW_PIPELINE_USERNAME must differ from the admin's name (MLFLOW_ADMIN_USERNAME)")
    _wait_healthy(uri)
    auth = get_app_client("basic-auth", tracking_uri=uri)  # as the admin (MLFLOW_TRACKING_USERNAME)
    try:
        auth.get_user(user)
    except MlflowException as err:
        if err.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        auth.create_user(user, password)
        print(f"MLflow user {user!r} created")
    else:
        auth.update_user_password(user, password)
        print(f"MLflow user {user!r} exists; password set from the environment")


if __name__ == "__main__":
    main()
