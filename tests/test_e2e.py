"""The whole DAG, run by Airflow's `dag.test()`, against a real MLflow server.

One module, in order: a first run promotes over the base model, a longer run
beats that champion, a run that cannot learn (lr 0) is rejected, a run with the
champion's data and config is skipped, a run on bad data stops at the gate.
After each, the registry must say exactly that.
"""

from __future__ import annotations

import html
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from conftest import SAMPLE

pytestmark = pytest.mark.slow

MODEL = "e2e-tiny-lora"


def _run(dag: Any, **conf: Any) -> Any:
    return dag.test(run_conf={"profile": "e2e", **conf})


def dag_run_note(dag_run: Any) -> str:
    """The note Airflow shows on the run (plugins/run_notes.py sets it when the run ends)."""
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session

    with create_session() as session:
        return str(session.query(DagRun).filter_by(dag_id=dag_run.dag_id, run_id=dag_run.run_id).one().note)


def _versions(client: Any) -> dict[str, Any]:
    return {v.version: v for v in client.search_model_versions(f"name='{MODEL}'")}


def _alias(client: Any, alias: str) -> str | None:
    aliases = client.get_registered_model(MODEL).aliases
    return str(aliases[alias]) if alias in aliases else None


@pytest.fixture(scope="module")
def client(module_tracking: str) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(module_tracking)


@dataclass
class Inbox:
    """What people were told: e-mails a real SMTP server on loopback received, and webhook posts."""
    mails: list[Any] = field(default_factory=list)
    posts: list[dict[str, Any]] = field(default_factory=list)

    def since(self, n_mails: int, n_posts: int) -> tuple[list[str], list[str]]:
        texts = [m.get_payload(decode=True).decode() if not m.is_multipart() else
                 "".join(p.get_payload(decode=True).decode() for p in m.walk() if p.get_content_type() == "text/html")
                 for m in self.mails[n_mails:]]
        return ([f"{m['Subject']}\n{html.unescape(t)}" for m, t in zip(self.mails[n_mails:], texts, strict=True)],
                [p["text"] for p in self.posts[n_posts:]])


@pytest.fixture(scope="module", autouse=True)
def inbox() -> Iterator[Inbox]:
    """SMTP (aiosmtpd) and a webhook sink on loopback, named by the Airflow connections the DAG's
    notifiers look for, for every run of this module."""
    import email
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from aiosmtpd.controller import Controller
    from conftest import free_port

    box = Inbox()

    class Mail:
        async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
            box.mails.append(email.message_from_bytes(envelope.content))
            return "250 OK"

    class Hook(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            box.posts.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    smtp = Controller(Mail(), hostname="127.0.0.1", port=free_port())
    smtp.start()
    web = ThreadingHTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=web.serve_forever, daemon=True).start()
    with pytest.MonkeyPatch.context() as env:
        env.setenv("AIRFLOW_CONN_RETRAIN_SMTP", json.dumps({
            "conn_type": "smtp", "host": "127.0.0.1", "port": smtp.port, "extra": {
                "from_email": "retrain@example.test", "to": "ml-team@example.test, oncall@example.test",
                "disable_ssl": True, "disable_tls": True}}))
        env.setenv("AIRFLOW_CONN_RETRAIN_WEBHOOK", f"http://127.0.0.1:{web.server_address[1]}/hooks/retrain")
        yield box
    smtp.stop()
    web.shutdown()


def test_first_run_promotes_over_the_base_model(retrain_dag: Any, tiny_model: Path, client: Any,
                                                inbox: Inbox, tmp_path: Path) -> None:
    dag_run = _run(retrain_dag)
    assert dag_run.state == "success"
    versions = _versions(client)
    assert list(versions) == ["1"]
    v1 = versions["1"]
    # the version's description is its review card: the decision, the scores, the links to the Airflow run
    card = client.get_model_version(MODEL, "1").description
    assert card.startswith("Promoted: test loss ")
    assert f"| {float(v1.tags['challenger_loss']):.4f} |" in card
    assert "python -m ml promote --profile e2e --version 1 --reason" in card  # the card's own registry and version
    assert "/dags/retrain_lora/runs/" in card and "/tasks/train)" in card and "**Answers** to 3 test questions" in card
    # the register task's buttons in Airflow open the MLflow run and the version (plugins/mlflow_links.py)
    from airflow import plugins_manager

    links = {link.name: link for link in plugins_manager.get_global_operator_extra_links()}
    register = dag_run.get_task_instance("register")
    assert links["MLflow run"].get_link(retrain_dag.get_task("register"), ti_key=register.key).endswith(
        f"/#/runs/{v1.run_id}?workflowType=machine_learning")  # MLflow's classic ML view, not GenAI's
    assert links["MLflow model version"].get_link(retrain_dag.get_task("register"), ti_key=register.key).endswith(
        f"/#/models/{MODEL}/versions/1?workflowType=machine_learning")
    # the train task's button opens the same run, pushed when the run opened, before training started
    assert links["MLflow run"].get_link(retrain_dag.get_task("train"), ti_key=dag_run.get_task_instance("train").key) \
        .endswith(f"/#/runs/{v1.run_id}?workflowType=machine_learning")
    assert links["MLflow model version"].get_link(retrain_dag.get_task("evaluate"),
                                                  ti_key=dag_run.get_task_instance("evaluate").key) == ""
    # people were told, by e-mail (to both recipients) and on the webhook: the decision, both losses, the link
    (mail,), (post,) = inbox.since(0, 0)
    assert inbox.mails[0]["To"] == "ml-team@example.test, oncall@example.test"
    for text in (mail, post):
        assert f"retrain_lora: PROMOTED - {MODEL} v1" in text and dag_run.run_id in text
        assert f"challenger {float(v1.tags['challenger_loss']):.4f} vs base model" in text
        assert f"/#/models/{MODEL}/versions/1?workflowType=machine_learning" in text and "improvement +" in text
    assert v1.tags["decision"] == "promoted" and v1.tags["baseline"] == "base model"
    # few tags on the version (the card says the rest); its run has them all
    from ml import registry

    assert set(v1.tags) <= set(registry.VERSION_TAGS) and len(v1.tags) <= 12 and "improvement_interval" in v1.tags
    assert float(v1.tags["challenger_loss"]) < float(v1.tags["baseline_loss"])
    assert _alias(client, "champion") == "1" and _alias(client, "previous_champion") is None

    run = client.get_run(v1.run_id)
    assert run.data.params["train.max_steps"] == "30" and run.data.params["lora.r"] == "16"
    assert run.data.tags["airflow.run_id"] == dag_run.run_id and len(run.data.tags["data_fingerprint"]) == 64
    assert run.data.tags["decision"] == "promoted" and run.data.metrics["promoted"] == 1
    # runs told apart in MLflow's runs table and in Airflow's runs list: profile, run date, decision
    day = dag_run.run_id.split("__")[1][:10]
    assert run.info.run_name.startswith(f"e2e {day} ") and run.info.run_name.endswith(" · promoted")
    assert dag_run_note(dag_run).startswith(f"promoted v1: challenger {float(v1.tags['challenger_loss']):.4f}")
    # the curve reached MLflow while the train task ran, each point with its step and time
    curve = client.get_metric_history(run.info.run_id, "train_loss")
    train_task = dag_run.get_task_instance("train")
    window = (train_task.start_date.timestamp() * 1000, train_task.end_date.timestamp() * 1000)
    assert sorted(m.step for m in curve) == list(range(1, 31))
    assert all(window[0] <= m.timestamp <= window[1] for m in curve), (window, [m.timestamp for m in curve])
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(run.data.metrics)
    # the version's tag is the same loss, written to 4 decimals
    assert run.data.metrics["test_loss"] == pytest.approx(float(v1.tags["challenger_loss"]), abs=5e-5)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "reports")}
    assert {"reports/loss_curve.png", "reports/sample_generations.json", "reports/evaluation.json",
            "reports/validation.json", "reports/decision.json"} <= artifacts
    # lineage: each split as a dataset input of the run, under the snapshot's fingerprint, from the source
    inputs = {i.tags[0].value: i.dataset for i in run.inputs.dataset_inputs}
    assert set(inputs) == {"training", "validation", "test"}
    fingerprint = run.data.tags["data_fingerprint"]
    for context, split in (("training", "train"), ("validation", "validation"), ("test", "test")):
        dataset = inputs[context]
        assert dataset.digest == fingerprint[:16] and dataset.name == f"pubmedqa_ko_sample ({split})"
        assert json.loads(dataset.source)["uri"].endswith("data/sample/pubmedqa_ko_sample.jsonl")
        columns = {c["name"] for c in json.loads(dataset.schema)["mlflow_colspec"]}
        assert {"QUESTION", "CONTEXTS", "LONG_ANSWER"} <= columns
    rows = {c: json.loads(inputs[c].profile)["num_rows"] for c in inputs}
    assert sum(rows.values()) == 80 and rows["test"] == int(run.data.metrics["test_rows_compared"])
    # the logged model carries its test scores, on the test split
    (model,) = client.search_logged_models([run.info.experiment_id], f"source_run_id = '{run.info.run_id}'")
    scores = {m.key: m for m in model.metrics}
    assert scores["test_loss"].value == pytest.approx(run.data.metrics["test_loss"])
    assert scores["test_loss"].dataset_digest == fingerprint[:16] and "baseline_test_loss" in scores
    import mlflow

    requirements = Path(mlflow.artifacts.download_artifacts(f"models:/{MODEL}/1/requirements.txt",
                                                            dst_path=str(tmp_path))).read_text()
    assert {"bitsandbytes", "peft", "transformers", "torch", "datasets"} <= {
        line.split("==")[0] for line in requirements.splitlines()}


def test_a_retried_register_task_does_not_register_twice(retrain_dag: Any, client: Any) -> None:
    from ml import pipeline
    from ml.config import load_config
    from ml.runs import run_paths

    run = client.get_run(_versions(client)["1"].run_id)
    run_key = run.data.tags["pipeline.run_key"]
    cfg = load_config("e2e")
    again = pipeline.register(cfg, run_paths(cfg, run_key), run_key)
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
    card = client.get_model_version(MODEL, "2").description
    assert "`train.max_steps` 30 → 90" in card and "0 training rows added, 0 removed" in card
    assert "| question | reference | challenger | champion v1 |" in card
    # The champion scored in run 2 is the model version 1 scored in run 1: same data, same loss.
    assert float(v2.tags["baseline_loss"]) == pytest.approx(float(_versions(client)["1"].tags["challenger_loss"]))


def test_worse_challenger_is_rejected_and_the_alias_stays(retrain_dag: Any, client: Any, inbox: Inbox) -> None:
    told = len(inbox.mails), len(inbox.posts)
    dag_run = _run(retrain_dag, profile="e2e-tiny-lr")
    assert dag_run.state == "success"
    (mail,), (post,) = inbox.since(*told)
    for text in (mail, post):
        assert f"kept the champion - {MODEL} v3" in text and "does not beat champion v2" in text
    versions = _versions(client)
    v3 = versions["3"]
    assert v3.tags["decision"] == "rejected" and v3.tags["baseline"] == "champion v2"
    assert float(v3.tags["challenger_loss"]) > float(v3.tags["baseline_loss"])
    assert _alias(client, "champion") == "2" and _alias(client, "previous_champion") == "1"
    run3 = client.get_run(v3.run_id)
    assert run3.data.tags["decision"] == "rejected" and run3.data.metrics["promoted"] == 0
    assert run3.info.run_name.startswith("e2e-tiny-lr ") and run3.info.run_name.endswith(" · rejected")
    assert dag_run_note(dag_run).startswith("kept the champion v3: ") and "does not beat champion v2" in \
        dag_run_note(dag_run)
    states = {ti.task_id: ti.state for ti in dag_run.get_task_instances()}
    assert states["keep_champion"] == "success" and states["promote_champion"] == "skipped"
    assert client.get_model_version(MODEL, "3").description.startswith("Kept out")


def test_a_run_with_the_champions_data_and_config_is_skipped(retrain_dag: Any, client: Any, inbox: Inbox) -> None:
    told = len(inbox.mails), len(inbox.posts)
    dag_run = _run(retrain_dag, max_steps=90)  # what made version 2, the champion
    assert dag_run.state == "success"
    (mail,), (post,) = inbox.since(*told)
    for text in (mail, post):
        assert f"run {dag_run.run_id} skipped" in text and "nothing changed since champion v2" in text
    states = {ti.task_id: ti.state for ti in dag_run.get_task_instances()}
    assert states["load"] == "success" and states["preflight"] == "skipped"
    assert all(states[t] == "skipped" for t in ("validate", "train", "register", "promote_champion", "summary"))
    assert sorted(_versions(client)) == ["1", "2", "3"] and _alias(client, "champion") == "2"
    exp = client.get_experiment_by_name("e2e")
    (note,) = client.search_runs([exp.experiment_id], f"tags.`pipeline.run_key` = 'retrain_lora__{dag_run.run_id}'")
    assert note.data.tags["decision"] == "skipped" and "nothing changed since champion v2" in \
        note.data.tags["decision_reason"]
    assert note.info.run_name.endswith(" · skipped") and note.data.metrics["promoted"] == 0
    assert dag_run_note(dag_run).startswith("skipped: nothing changed since champion v2")


def test_a_rejected_version_cannot_be_promoted(client: Any) -> None:
    from ml import pipeline
    from ml.config import load_config
    from ml.runs import run_paths

    run_key = client.get_run(_versions(client)["3"].run_id).data.tags["pipeline.run_key"]
    cfg = load_config("e2e-tiny-lr")
    with pytest.raises(RuntimeError, match="version 3 was not chosen for promotion"):
        pipeline.promote(cfg, run_paths(cfg, run_key))
    assert _alias(client, "champion") == "2" and _versions(client)["3"].tags["decision"] == "rejected"


def test_failed_gate_stops_the_run_and_leaves_the_registry_alone(
        retrain_dag: Any, client: Any, tmp_path: Path, inbox: Inbox) -> None:
    told = len(inbox.mails), len(inbox.posts)
    rows = [json.loads(line) for line in SAMPLE.read_text(encoding="utf-8").splitlines()]
    rows[0]["LONG_ANSWER"] = ""
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows), encoding="utf-8")
    before = _versions(client)
    dag_run = _run(retrain_dag, dataset=str(bad))
    assert dag_run.state == "failed"
    states = {ti.task_id: ti.state for ti in dag_run.get_task_instances()}
    assert states["validate"] == "failed"
    (mail,), (post,) = inbox.since(*told)  # the failure, told once: which task, why, where its log is
    for text in (mail, post):
        assert f"task validate failed (run {dag_run.run_id})" in text and "data-quality gate FAILED" in text
        assert "content" in text and "/dags/retrain_lora/runs/" in text and "/tasks/validate" in text
    assert all(states[t] in ("upstream_failed", None) for t in ("prepare", "train", "register", "promote_champion"))
    assert _versions(client).keys() == before.keys() and _alias(client, "champion") == "2"
    # ... but reviewers find a run saying why: tagged failed, with GX's report and the HTML page.
    exp = client.get_experiment_by_name("e2e")
    (run,) = client.search_runs([exp.experiment_id], "tags.validation = 'failed'")
    assert run.info.status == "FAILED" and run.data.tags["pipeline.stage"] == "validation"
    assert run.info.run_name.endswith(" · gate failed") and run.data.tags["decision"] == "gate_failed"
    assert dag_run_note(dag_run).startswith("gate failed: ")
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
    # it carries its signature and an input example (a test question), on which it answers
    example = model.input_example
    assert list(example.columns) == ["QUESTION", "CONTEXTS"] and len(example) == 1 and example["QUESTION"][0]
    assert model.metadata.get_input_schema().input_names() == ["QUESTION", "CONTEXTS"]
    (answer,) = model.predict(example, params={"max_new_tokens": 4})
    assert isinstance(answer, str)
