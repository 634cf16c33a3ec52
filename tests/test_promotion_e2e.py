"""Promotion against a real MLflow server, with real tiny-model training: another tokenizer,
concurrent pipelines, a manual rollback mid-run, a reused run key, a re-keyed dataset, an
unchanged dataset. Each test has a registered model of its own."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, SAMPLE

from ml import pipeline
from ml.config import load_config
from ml.data import read_split
from ml.errors import GateFailed, RegistryConflict
from ml.pipeline.local import run_all
from ml.runs import RunPaths, read_json, run_paths

pytestmark = pytest.mark.slow


def _cfg(name: str, tmp: Path, **overrides: Any) -> Any:
    return load_config("e2e", {"registry.model_name": name, "output_dir": str(tmp / "runs"), **overrides})


def _until_register(cfg: Any, key: str) -> Any:
    paths = run_paths(cfg, key)
    cfg = pipeline.freeze(cfg, paths)
    for step in (pipeline.load, pipeline.validate, pipeline.prepare, pipeline.train, pipeline.evaluate):
        step(cfg, paths)
    pipeline.register(cfg, paths, key)
    return paths


def _alias(client: Any, name: str, alias: str) -> str | None:
    aliases = client.get_registered_model(name).aliases
    return str(aliases[alias]) if alias in aliases else None


def _version_of(client: Any, name: str, run_key: str) -> Any:
    (v,) = [v for v in client.search_model_versions(f"name='{name}'") if v.tags.get("pipeline.run_key") == run_key]
    return v


@pytest.fixture()
def client(tracking: str) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(tracking)


def test_a_challenger_with_another_tokenizer_is_not_promoted_and_says_why(
        client: Any, tiny_model: Path, tmp_path: Path) -> None:
    from ml.prompt import PromptFormat
    from ml.sources import load_examples
    from ml.tiny import build_tiny_model

    cfg = _cfg("p-tokenizer", tmp_path)
    assert run_all(cfg, "first")["promoted"]
    other = build_tiny_model(load_examples(cfg.data), tmp_path / "tiny-1024", PromptFormat.from_config(cfg),
                             vocab_size=1024)
    result = run_all(_cfg("p-tokenizer", tmp_path, **{"model.base_model": str(other)}), "other-tokenizer")
    assert result["outcome"] == "needs_review" and "different tokenizers" in result["reason"], result
    assert "per answer byte" in result["reason"]
    assert _alias(client, "p-tokenizer", "champion") == "1"
    assert _version_of(client, "p-tokenizer", "other-tokenizer").tags["decision"] == "needs_review"


def test_two_pipelines_started_together_end_with_the_better_model_on_champion(
        client: Any, tiny_model: Path, tmp_path: Path) -> None:
    """Both create their new experiment at once (one finds the other's); both are scored against the
    base model; whichever promotes second finds @champion moved, is scored again against it, and
    moves the alias only if it is better."""
    name = "p-race"
    procs = {key: subprocess.Popen(
        [sys.executable, "-m", "ml", "pipeline", "--profile", "e2e", "--run-key", key,
         "--set", f"registry.model_name={name}", "--set", f"registry.experiment={name}",
         "--set", f"output_dir={tmp_path / 'runs'}",
         "--set", f"train.max_steps={steps}"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for key, steps in (("weak", 3), ("strong", 60))}
    outputs = {key: p.communicate(timeout=900)[0] for key, p in procs.items()}
    for key, p in procs.items():
        assert p.returncode == 0, outputs[key][-3000:]
    weak, strong = _version_of(client, name, "weak"), _version_of(client, name, "strong")
    assert _alias(client, name, "champion") == str(strong.version), (weak.tags, strong.tags)
    # previous_champion names whatever held the alias before the strong run took it
    held_before = str(weak.version) if weak.tags["decision"] == "promoted" else None
    assert _alias(client, name, "previous_champion") == held_before
    if held_before is None:  # the strong run promoted first; the weak one was scored again against it
        assert "champion v" in weak.tags["baseline"] and weak.tags["decision"] == "rejected", weak.tags


def test_a_worse_run_promoting_last_is_scored_again_against_the_new_champion(
        client: Any, tiny_model: Path, tmp_path: Path) -> None:
    """The interleaving that used to put the worse model on @champion, made deterministic: both
    runs are evaluated against the base model before either promotes; the better one promotes first."""
    name = "p-interleave"
    weak_cfg = _cfg(name, tmp_path, **{"train.max_steps": 3})
    strong_cfg = _cfg(name, tmp_path, **{"train.max_steps": 60})
    weak, strong = _until_register(weak_cfg, "weak"), _until_register(strong_cfg, "strong")
    for paths in (weak, strong):
        ev = read_json(paths.evaluation)
        assert ev["decision"]["outcome"] == "promote" and ev["champion_version"] is None
        assert ev["scored_in"] == "training process"  # scored by the trainer, with its model loaded
    pipeline.promote(strong_cfg, strong, "strong")
    result = pipeline.promote(weak_cfg, weak, "weak")
    assert read_json(weak.evaluation)["scored_in"] == "promote step"  # @champion moved
    strong_version = read_json(strong.registered)["version"]
    assert not result["promoted"] and f"champion v{strong_version}" in result["reason"], result
    assert _alias(client, name, "champion") == strong_version and _alias(client, name, "previous_champion") is None


def test_a_manual_rollback_between_evaluate_and_promote_is_respected(
        client: Any, tiny_model: Path, tmp_path: Path) -> None:
    name = "p-rollback"
    for key, steps in (("r1", 3), ("r2", 30)):
        assert run_all(_cfg(name, tmp_path, **{"train.max_steps": steps}), key)["promoted"], key
    cfg = _cfg(name, tmp_path, **{"train.max_steps": 90})
    paths = _until_register(cfg, "r3")
    assert read_json(paths.evaluation)["decision"]["outcome"] == "promote"
    out = subprocess.run([sys.executable, "-m", "ml", "rollback", "--profile", "e2e", "--set",
                          f"registry.model_name={name}", "--reason", "v2 answers drift"],
                         cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert (_alias(client, name, "champion"), _alias(client, name, "previous_champion")) == ("1", "2")
    v1 = client.get_model_version(name, "1")
    assert "rollback by" in v1.tags["manual_decision"] and "v2 answers drift" in v1.tags["manual_decision"]

    result = pipeline.promote(pipeline.freeze(cfg, paths), paths, "r3")
    assert result["outcome"] == "needs_review" and "moved by hand" in result["reason"], result
    assert _alias(client, name, "champion") == "1" and client.get_model_version(name, "3").tags["decision"] == \
        "needs_review"
    # the reviewer decides: promoted by hand, with the same bookkeeping
    out = subprocess.run([sys.executable, "-m", "ml", "promote", "--profile", "e2e", "--set",
                          f"registry.model_name={name}", "--version", "3", "--reason", "reviewed the answers"],
                         cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert (_alias(client, name, "champion"), _alias(client, name, "previous_champion")) == ("3", "1")
    assert "promotion by" in client.get_model_version(name, "3").tags["manual_decision"]
    missing = subprocess.run([sys.executable, "-m", "ml", "promote", "--profile", "e2e", "--set",
                              f"registry.model_name={name}", "--version", "3"],
                             cwd=ROOT, capture_output=True, text=True)
    assert missing.returncode == 2 and "needs a --reason" in missing.stderr


def test_a_rerun_under_a_reused_key_never_promotes_the_earlier_attempts_adapter(
        client: Any, tiny_model: Path, tmp_path: Path) -> None:
    name = "p-rerun"
    cfg = _cfg(name, tmp_path, **{"train.max_steps": 30})
    paths = _until_register(cfg, "same-key")
    first = read_json(paths.registered)

    def artifacts(version: str) -> dict[str, bytes]:  # every file of the version's run and model, by path
        import mlflow

        files = {}
        for uri in (f"runs:/{first['run_id']}/", f"models:/{name}/{version}"):
            dst = tmp_path / f"dl-{len(list(tmp_path.iterdir()))}"
            root = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst)))
            files.update({f"{uri}|{f.relative_to(root)}": f.read_bytes() for f in root.rglob("*") if f.is_file()})
        return files

    kept = artifacts(first["version"])
    assert any(k.endswith("adapter_model.safetensors") for k in kept)
    assert any(k.endswith("reports/evaluation.json") for k in kept)
    # another attempt under the same key trains again (its finished training removed: a retry would
    # reuse it) and rewrites the adapter after that evaluation
    shutil.rmtree(paths.train)
    pipeline.train(_cfg(name, tmp_path, **{"train.max_steps": 32, "train.learning_rate": 1e-3}), paths)
    with pytest.raises(RegistryConflict, match="not the one evaluated"):
        pipeline.promote(cfg, paths, "same-key")
    assert _alias(client, name, "champion") is None
    # evaluated again, it registers as a version of its own (not the first attempt's), and only that promotes
    pipeline.evaluate(cfg, paths)
    second = pipeline.register(cfg, paths, "same-key")
    assert second["version"] != first["version"]
    pipeline.promote(cfg, paths, "same-key")
    assert _alias(client, name, "champion") == second["version"]
    adapters = {v.version: v.tags["adapter_sha256"] for v in client.search_model_versions(f"name='{name}'")}
    assert adapters[first["version"]] != adapters[second["version"]]
    assert second["run_id"] != first["run_id"] and artifacts(first["version"]) == kept  # nothing overwritten
    # each version's run holds the settings that trained its adapter (logged by the training run)
    assert client.get_run(second["run_id"]).data.params["train.max_steps"] == "32"
    assert client.get_run(first["run_id"]).data.params["train.max_steps"] == "30"


def test_the_champion_is_never_scored_on_its_own_training_rows_after_the_dataset_is_rekeyed(
        client: Any, tiny_model: Path, tmp_path: Path) -> None:
    name = "p-rekey"
    first = run_all(_cfg(name, tmp_path), "by-pmid")
    assert first["promoted"]
    trained_questions = {ex.question for ex in read_split(Path(first["run_dir"]) / "splits", "train")}
    # keyed by question text instead of PMID: every key changes, and so do the splits
    rekeyed = _cfg(name, tmp_path, **{"data.id_column": None})
    result = run_all(rekeyed, "by-question")
    ev = read_json(RunPaths(Path(result["run_dir"])).evaluation)
    test = read_split(Path(result["run_dir"]) / "splits", "test")
    overlap = {ex.key for ex in test if ex.question in trained_questions}
    assert overlap and set(ev["excluded_rows"]) == overlap
    decision = ev["decision"]
    assert decision["dropped_rows"] == len(overlap)
    assert decision["rows"] == len(test) - len(overlap) or decision["outcome"] == "needs_review"
    if decision["outcome"] == "needs_review":
        assert f"{len(overlap)} dropped" in decision["reason"]


def test_an_unchanged_run_is_skipped_visibly_and_force_trains(client: Any, tiny_model: Path, tmp_path: Path) -> None:
    name = "p-skip"
    cfg = _cfg(name, tmp_path, **{"train.max_steps": 10})
    assert run_all(cfg, "first")["promoted"]
    again = run_all(cfg, "again")
    assert "nothing changed since champion v1" in again["skipped"] and "train" not in again["seconds"]
    assert not (Path(again["run_dir"]) / "train").exists()
    assert len(client.search_model_versions(f"name='{name}'")) == 1
    exp = client.get_experiment_by_name(cfg.registry.experiment)
    (note,) = client.search_runs([exp.experiment_id], "tags.`pipeline.run_key` = 'again'")
    assert note.data.tags["decision"] == "skipped" and note.info.status == "FINISHED"
    forced = run_all(cfg, "forced", force=True)
    assert "skipped" not in forced and json.loads(json.dumps(forced))["version"] == "2"
    # The champion in a run folder is fetched once (run_all fetches it while the gate runs, train finds
    # it there), and again when @champion has moved since.
    paths = run_paths(cfg, "fetched")
    champ = pipeline.fetch_champion(cfg, paths)
    mlmodel = Path(champ.model_dir) / "MLmodel"
    stamp = mlmodel.stat().st_ino, mlmodel.stat().st_mtime_ns
    assert pipeline.fetch_champion(cfg, paths) == champ and (mlmodel.stat().st_ino, mlmodel.stat().st_mtime_ns) == stamp
    other = "1" if champ.version == "2" else "2"
    client.set_registered_model_alias(name, "champion", other)
    assert pipeline.fetch_champion(cfg, paths).version == other


def test_the_skip_counts_the_base_models_weights_and_only_training_settings(
        client: Any, tiny_model: Path, tmp_path: Path) -> None:
    """Preflight against a champion registered with this run's data, training settings and base (the
    tags register writes): skipped, also when only operational settings differ; trained once the base's
    weights change under the same path."""
    import mlflow
    from safetensors.torch import load_file, save_file

    from ml.base_models import current_identity
    from ml.identity import config_hash

    name, base = "p-skip-base", tmp_path / "base"
    shutil.copytree(tiny_model, base)
    cfg = _cfg(name, tmp_path, **{"model.base_model": str(base)})
    paths = run_paths(cfg, "probe")
    pipeline.load(pipeline.freeze(cfg, paths, first=True), paths)
    with mlflow.start_run(experiment_id=client.create_experiment("p-skip-base")) as run:
        mlflow.log_text("weights", "model/adapter.txt")
    client.create_registered_model(name)
    version = client.create_model_version(name, f"runs:/{run.info.run_id}/model", run.info.run_id, tags={
        "data_fingerprint": read_json(paths.snapshot)["fingerprint"], "config_sha256": config_hash(cfg),
        "base_identity": current_identity(str(base))})
    client.set_registered_model_alias(name, "champion", version.version)

    assert "nothing changed since champion v1" in (pipeline.preflight(cfg, paths) or "")
    operational = _cfg(name, tmp_path, **{"model.base_model": str(base), "eval.batch_size": 3,
                                          "registry.approval": "required", "train.logging_steps": 5})
    assert config_hash(operational) == config_hash(cfg) and pipeline.preflight(operational, paths)
    training = _cfg(name, tmp_path, **{"model.base_model": str(base), "lora.r": 4})
    assert pipeline.preflight(training, paths) is None

    weights = next(base.glob("*.safetensors"))
    tensors = load_file(weights)
    first = sorted(tensors)[0]
    tensors[first] = tensors[first] + 0.01  # the base rebuilt under the same path
    save_file(tensors, weights, metadata={"format": "pt"})
    assert pipeline.preflight(cfg, paths) is None


def test_a_run_on_bad_data_stops_at_the_gate_and_says_why(client: Any, tiny_model: Path, tmp_path: Path) -> None:
    """`run_all` runs the gate in a process of its own beside the registry checks: its failure still
    stops the run before training, names the row, and leaves a failed run in MLflow and no version."""
    rows = [json.loads(line) for line in SAMPLE.read_text(encoding="utf-8").splitlines()]
    rows[2]["LONG_ANSWER"] = " "
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows), encoding="utf-8")
    cfg = _cfg("p-gate", tmp_path, **{"data.source": str(bad), "registry.experiment": "p-gate"})
    with pytest.raises(GateFailed, match="data-quality gate FAILED") as failed:
        run_all(cfg, "bad-data")
    assert rows[2]["PMID"] in str(failed.value) and "[content]" in str(failed.value)
    run_dir = tmp_path / "runs" / "bad-data"
    assert not json.loads(RunPaths(run_dir).validation.read_text())["success"]
    assert not (run_dir / "splits").exists() and not (run_dir / "train").exists()
    assert client.search_model_versions("name='p-gate'") == []
    exp = client.get_experiment_by_name(cfg.registry.experiment)
    (run,) = client.search_runs([exp.experiment_id], "tags.`pipeline.run_key` = 'bad-data'")
    assert run.info.status == "FAILED" and run.data.tags["validation"] == "failed"


def _decisions_file(tmp: Path, name: str, train: str, held_out: str) -> Path:
    """The shipped sample with every answer led by its decision: `train` on the training rows,
    `held_out` on the validation and test rows (the split is a function of the key alone)."""
    from ml.data import assign_split

    cfg = load_config("e2e")
    rows = [json.loads(line) for line in SAMPLE.read_text(encoding="utf-8").splitlines()]
    for row in rows:
        split = assign_split(str(row["PMID"]), cfg.data.val_fraction, cfg.data.test_fraction)
        row["final_decision"] = train if split == "train" else held_out
    path = tmp / name
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows), encoding="utf-8")
    return path


def test_a_better_loss_with_clearly_worse_decisions_is_kept_and_without_that_guardrail_promoted(
        client: Any, tiny_model: Path, tmp_path: Path) -> None:
    """The champion learnt to lead with "Yes", which every test row says; the challenger trains longer
    (a clearly better loss) on rows that all say "No": its decisions are clearly worse, so the guardrail
    keeps the champion and says why. The same challenger judged by a profile without that guardrail
    is promoted: the guardrail, not the loss, kept it."""
    name = "p-guardrail"
    lead = {"data.lead_with_decision": True, "train.learning_rate": 1e-2}
    champion_cfg = _cfg(name, tmp_path, **lead, **{"train.max_steps": 3,
                                                   "data.source": str(_decisions_file(tmp_path, "a.jsonl", "yes",
                                                                                      "yes"))})
    assert run_all(champion_cfg, "champion")["promoted"]
    data = str(_decisions_file(tmp_path, "b.jsonl", "no", "yes"))
    cfg = _cfg(name, tmp_path, **lead, **{"train.max_steps": 90, "data.source": data})
    paths = _until_register(cfg, "challenger")
    ev = read_json(paths.evaluation)
    decision, (accuracy, _) = ev["decision"], ev["decision"]["guardrails"]
    assert decision["challenger_loss"] < decision["baseline_loss"] and decision["low"] > cfg.registry.min_delta
    assert accuracy["metric"] == "decision_accuracy" and accuracy["verdict"] == "blocks"
    assert accuracy["challenger"] < accuracy["baseline"] and accuracy["high"] < -accuracy["margin"]
    assert decision["outcome"] == "keep" and decision["reason"].startswith("KEPT by the guardrail decision_accuracy")
    assert f"challenger {accuracy['challenger']:.1%} vs champion v1 {accuracy['baseline']:.1%}" in decision["reason"]
    assert pipeline.keep(cfg, paths)["outcome"] == "keep" and _alias(client, name, "champion") == "1"
    version = _version_of(client, name, "challenger")
    assert version.tags["decision"] == "rejected"
    assert "decision_accuracy blocks" in client.get_run(version.run_id).data.tags["guardrails"]
    card = client.get_model_version(name, version.version).description
    assert "| yes/no/maybe right (guardrail, margin 2.0%) |" in card
    metrics = client.get_run(version.run_id).data.metrics
    assert metrics["guardrail_decision_accuracy"] < metrics["baseline_guardrail_decision_accuracy"]

    # the flip: without the decision guardrail the same challenger, on the same scores, is promoted
    flip = _cfg(name, tmp_path, **lead, **{"train.max_steps": 90, "data.source": data,
                                           "registry.guardrails": [{"metric": "degenerate_answers"}]})
    assert pipeline.evaluate(flip, paths)["outcome"] == "promote"
    assert pipeline.promote(flip, paths, "challenger")["promoted"]
    assert _alias(client, name, "champion") == version.version


def test_the_local_runner_has_nobody_to_ask_for_a_required_approval(
        client: Any, tiny_model: Path, tmp_path: Path) -> None:
    """`python -m ml pipeline` with registry.approval required: the rule's promotion waits for a
    person, who promotes by hand; nothing moves."""
    cfg = _cfg("p-approval", tmp_path, **{"registry.approval": "required", "train.max_steps": 10})
    result = run_all(cfg, "asks")
    assert result["outcome"] == "needs_review" and not result["promoted"]
    assert "python -m ml promote --version N" in result["reason"] and "The rule: challenger" in result["reason"]
    assert _alias(client, "p-approval", "champion") is None
    version = _version_of(client, "p-approval", "asks")
    assert version.tags["decision"] == "needs_review"
    assert client.get_model_version("p-approval", version.version).description.startswith(
        "Needs review (registry.approval is required and nobody was asked): test loss ")
