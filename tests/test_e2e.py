"""The whole DAG, run by Airflow's `dag.test()`, against a real MLflow server.

One module, in order: a first run promotes over the base model, a longer run
beats that champion, a run that cannot learn (lr 0) is rejected, a run with the
champion's data and config is skipped, a run on bad data stops at the gate.
After each, the registry must say exactly that.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from conftest import SAMPLE

pytestmark = pytest.mark.slow

MODEL = "e2e-tiny-lora"


def _run(dag: Any, **conf: Any) -> Any:
    return dag.test(run_conf={"profile": "e2e", **conf})


def _versions(client: Any) -> dict[str, Any]:
    return {v.version: v for v in client.search_model_versions(f"name='{MODEL}'")}


def _alias(client: Any, alias: str) -> str | None:
    aliases = client.get_registered_model(MODEL).aliases
    return str(aliases[alias]) if alias in aliases else None


@pytest.fixture(scope="module")
def client(module_tracking: str) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(module_tracking)


def test_first_run_promotes_over_the_base_model(retrain_dag: Any, tiny_model: Path, client: Any) -> None:
    dag_run = _run(retrain_dag)
    assert dag_run.state == "success"
    versions = _versions(client)
    assert list(versions) == ["1"]
    v1 = versions["1"]
    assert v1.tags["decision"] == "promoted" and v1.tags["baseline"] == "base model"
    assert float(v1.tags["challenger_loss"]) < float(v1.tags["baseline_loss"])
    assert _alias(client, "champion") == "1" and _alias(client, "previous_champion") is None

    run = client.get_run(v1.run_id)
    assert run.data.params["train.max_steps"] == "30" and run.data.params["lora.r"] == "16"
    assert run.data.tags["airflow.run_id"] == dag_run.run_id and len(run.data.tags["data_fingerprint"]) == 64
    assert run.data.tags["decision"] == "promoted"
    assert len(client.get_metric_history(run.info.run_id, "train_loss")) == 30
    assert run.data.metrics["test_loss"] == pytest.approx(float(v1.tags["challenger_loss"]))
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "reports")}
    assert {"reports/loss_curve.png", "reports/sample_generations.json", "reports/evaluation.json",
            "reports/validation.json", "reports/decision.json"} <= artifacts


def test_a_retried_register_task_does_not_register_twice(retrain_dag: Any, client: Any) -> None:
    from ml import pipeline
    from ml.config import load_config

    run = client.get_run(_versions(client)["1"].run_id)
    run_key = run.data.tags["pipeline.run_key"]
    cfg = load_config("e2e")
    again = pipeline.register(cfg, pipeline.run_paths(cfg, run_key), run_key)
    assert again["version"] == "1" and again["run_id"] == run.info.run_id
    assert list(_versions(client)) == ["1"]


def test_better_challenger_takes_the_alias_and_keeps_the_previous(retrain_dag: Any, client: Any) -> None:
    dag_run = _run(retrain_dag, max_steps=90)
    assert dag_run.state == "success"
    v2 = _versions(client)["2"]
    assert v2.tags["baseline"] == "champion v1"
    assert float(v2.tags["challenger_loss"]) < float(v2.tags["baseline_loss"])
    assert v2.tags["decision"] == "promoted"
    assert _alias(client, "champion") == "2" and _alias(client, "previous_champion") == "1"
    # The champion scored in run 2 is the model version 1 scored in run 1: same data, same loss.
    assert float(v2.tags["baseline_loss"]) == pytest.approx(float(_versions(client)["1"].tags["challenger_loss"]))


def test_worse_challenger_is_rejected_and_the_alias_stays(retrain_dag: Any, client: Any) -> None:
    dag_run = _run(retrain_dag, profile="e2e-lr0")
    assert dag_run.state == "success"
    versions = _versions(client)
    v3 = versions["3"]
    assert v3.tags["decision"] == "rejected" and v3.tags["baseline"] == "champion v2"
    assert float(v3.tags["challenger_loss"]) > float(v3.tags["baseline_loss"])
    assert _alias(client, "champion") == "2" and _alias(client, "previous_champion") == "1"
    assert client.get_run(v3.run_id).data.tags["decision"] == "rejected"
    states = {ti.task_id: ti.state for ti in dag_run.get_task_instances()}
    assert states["keep_champion"] == "success" and states["promote_champion"] == "skipped"


def test_a_run_with_the_champions_data_and_config_is_skipped(retrain_dag: Any, client: Any) -> None:
    dag_run = _run(retrain_dag, max_steps=90)  # what made version 2, the champion
    assert dag_run.state == "success"
    states = {ti.task_id: ti.state for ti in dag_run.get_task_instances()}
    assert states["load"] == "success" and states["preflight"] == "skipped"
    assert all(states[t] == "skipped" for t in ("validate", "train", "register", "promote_champion", "summary"))
    assert sorted(_versions(client)) == ["1", "2", "3"] and _alias(client, "champion") == "2"
    exp = client.get_experiment_by_name("e2e")
    (note,) = client.search_runs([exp.experiment_id], f"tags.`pipeline.run_key` = 'retrain_lora__{dag_run.run_id}'")
    assert note.data.tags["decision"] == "skipped" and "nothing changed since champion v2" in \
        note.data.tags["decision_reason"]


def test_a_rejected_version_cannot_be_promoted(client: Any) -> None:
    from ml import pipeline
    from ml.config import load_config

    run_key = client.get_run(_versions(client)["3"].run_id).data.tags["pipeline.run_key"]
    cfg = load_config("e2e-lr0")
    with pytest.raises(RuntimeError, match="version 3 was not chosen for promotion"):
        pipeline.promote(cfg, pipeline.run_paths(cfg, run_key))
    assert _alias(client, "champion") == "2" and _versions(client)["3"].tags["decision"] == "rejected"


def test_failed_gate_stops_the_run_and_leaves_the_registry_alone(
        retrain_dag: Any, client: Any, tmp_path: Path) -> None:
    rows = [json.loads(line) for line in SAMPLE.read_text(encoding="utf-8").splitlines()]
    rows[0]["LONG_ANSWER"] = ""
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows), encoding="utf-8")
    before = _versions(client)
    dag_run = _run(retrain_dag, dataset=str(bad))
    assert dag_run.state == "failed"
    states = {ti.task_id: ti.state for ti in dag_run.get_task_instances()}
    assert states["validate"] == "failed"
    assert all(states[t] in ("upstream_failed", None) for t in ("prepare", "train", "register", "promote_champion"))
    assert _versions(client).keys() == before.keys() and _alias(client, "champion") == "2"
    # ... but reviewers find a run saying why: tagged failed, with GX's report and the HTML page.
    exp = client.get_experiment_by_name("e2e")
    (run,) = client.search_runs([exp.experiment_id], "tags.validation = 'failed'")
    assert run.info.status == "FAILED" and run.data.tags["pipeline.stage"] == "validation"
    assert run.data.tags["pipeline.run_key"] == f"retrain_lora__{dag_run.run_id}"
    assert {a.path for a in client.list_artifacts(run.info.run_id, "reports")} == {
        "reports/validation.json", "reports/validation.html"}
    gx_result = json.loads(Path(client.download_artifacts(run.info.run_id, "reports/validation.json",
                                                          str(tmp_path))).read_text())
    failed = [r for r in gx_result["results"] if not r["success"]]
    assert {r["expectation_config"]["meta"]["family"] for r in failed} == {"content"}
    assert any(rows[0]["PMID"] == row["key"] for r in failed for row in r["result"]["partial_unexpected_index_list"])


def test_champion_loads_as_pyfunc_and_generates(client: Any) -> None:
    import mlflow
    import pandas as pd

    model = mlflow.pyfunc.load_model(f"models:/{MODEL}@champion")
    answers = model.predict(pd.DataFrame([
        {"QUESTION": "규칙적인 운동은 혈압을 낮추는가?", "CONTEXTS": ["고혈압 환자 대상 무작위 연구."]},
        {"QUESTION": "금연은 폐 기능을 개선하는가?", "CONTEXTS": None},
    ]), params={"max_new_tokens": 6})
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
