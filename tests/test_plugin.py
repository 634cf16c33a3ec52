"""The Airflow plugin as Airflow's plugin manager loads it from plugins/."""

from __future__ import annotations


def test_plugin_registers_links_to_the_mlflow_ui() -> None:
    from airflow import plugins_manager

    assert plugins_manager.get_import_errors() == {}
    info = {p["name"]: p for p in plugins_manager.get_plugin_info()}
    assert "mlflow_links" in info
    views = info["mlflow_links"]["external_views"]
    assert {v["name"] for v in views} == {"MLflow model registry", "MLflow experiments"}
    assert all(v["href"].startswith("http") and v["destination"] == "nav" for v in views)
