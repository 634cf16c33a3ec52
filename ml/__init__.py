"""LoRA retraining pipeline: data, validation, training, evaluation, registry.

Everything here runs without Airflow; `dags/` only orchestrates these steps.
"""

import logging
import os

# Great Expectations may send usage statistics; no data about this project leaves the machine.
# Set here, before any module of the package imports it.
os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
# MLflow's artifact transfers draw progress bars on stderr: in a task log, ERROR lines of "\r" frames.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

# Libraries that log routine chatter at INFO (GX: ~200 lines per import about its docs decorators;
# datasets: which frameworks it found; MLflow's local store: its table migrations) or warn about
# what does not apply here (bitsandbytes' CPU 4-bit kernel: nothing runs in 4-bit on the CPU).
# Their warnings and errors still show, above these levels; set here, before they are imported.
for _name, _level in (("great_expectations", logging.WARNING), ("datasets", logging.WARNING),
                      ("mlflow.store.db.utils", logging.WARNING), ("alembic", logging.WARNING),
                      ("bitsandbytes.backends.cpu.ops", logging.ERROR)):
    logging.getLogger(_name).setLevel(_level)


def configure_logging() -> None:
    """How `python -m ml` and the worker processes it starts log: INFO and above, to stderr, in the
    format ML_LOG_FORMAT names (the trainer's, streamed into its parent's log, drops the time)."""
    fmt = os.environ.get("ML_LOG_FORMAT", "%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.basicConfig(level=logging.INFO, format=fmt)
