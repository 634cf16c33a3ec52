"""LoRA retraining pipeline: data, validation, training, evaluation, registry.

Everything here runs without Airflow; `dags/` only orchestrates these steps.
"""
