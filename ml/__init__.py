"""LoRA retraining pipeline: data, validation, training, evaluation, registry.

Everything here runs without Airflow; `dags/` only orchestrates these steps.
"""

import os

# Great Expectations may send usage statistics; no data about this project leaves the machine.
# Set here, before any module of the package imports it.
os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
