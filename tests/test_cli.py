"""`python -m ml`: each step without Airflow, and the validate exit codes."""

from __future__ import annotations

import http.server
import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

from conftest import ROOT, SAMPLE

from ml.config import DEFAULT_PROFILE, DataConfig, ModelConfig
from ml.runs import RunPaths


def _ml(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ml", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def test_help_lists_every_step() -> None:
    out = _ml("--help")
    assert out.returncode == 0
    for step in ("validate", "load", "prepare", "train", "evaluate", "register", "promote", "pipeline",
                 "tiny-model"):
        assert step in out.stdout


def test_validate_passes_on_the_sample(tmp_path: Path, tiny_model: Path) -> None:
    report = tmp_path / "report.json"
    out = _ml("validate", "--data", str(SAMPLE), "--profile", "e2e", "--report", str(report))
    assert out.returncode == 0, out.stderr
    assert json.loads(report.read_text())["success"] is True
    assert "Data-quality gate PASSED" in report.with_suffix(".html").read_text()


def test_validate_fails_the_gate_with_named_checks(tmp_path: Path, tiny_model: Path) -> None:
    rows = [json.loads(line) for line in SAMPLE.read_text(encoding="utf-8").splitlines()]
    rows[3]["LONG_ANSWER"] = "   "
    rows[5]["QUESTION"] = rows[4]["QUESTION"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows), encoding="utf-8")
    out = _ml("validate", "--data", str(bad), "--profile", "e2e", "--report", str(tmp_path / "r.json"))
    assert out.returncode == 1, out.stderr
    lines = out.stdout.splitlines()
    assert f"  - [content] LONG_ANSWER: 1 of 80 rows is empty or blank; answers must be 10-5,000 characters of text " \
           f"(validation.answer_chars) (PMID {rows[3]['PMID']})" in lines
    assert any(line.startswith("  - [uniqueness] QUESTION: 2 of 80 rows ask a question another row asks too")
               and rows[5]["PMID"] in line for line in lines)
    assert json.loads((tmp_path / "r.json").read_text())["success"] is False


def test_validate_unusable_input_exits_2(tmp_path: Path) -> None:
    assert _ml("validate", "--data", str(tmp_path / "absent.jsonl")).returncode == 2
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text('{"question": "q"}\n')
    out = _ml("validate", "--data", str(wrong))
    assert out.returncode == 2 and "QUESTION" in out.stderr
    assert _ml("validate", "--data", str(SAMPLE), "--profile", "nope").returncode == 2
    # The seed profile's tokenizer is on the (unreachable) hub: the fit check cannot run.
    out = _ml("validate", "--data", str(SAMPLE), "--profile", "pubmedqa-ko-llama31-8b")
    assert out.returncode == 2 and "tokenizer" in out.stderr


def test_bad_input_ends_in_one_clear_line_and_exit_2(tmp_path: Path) -> None:
    out_dir = tmp_path / "runs"
    cases = {
        ("evaluate", "--run-key", "never-loaded"): "pass the --run-key",
        ("load", "--run-key", "it's"): "without quotes",
        ("load", "--run-key", "k" * 300): "is too long",
        ("load", "--set", "train.max_steps=0"): "untrained adapter",
        ("load", "--set", "train.max_steps=9223372036854775807"): "max_steps",
        ("load", "--set", "train.num_train_epochs=1e12"): "num_train_epochs",
    }
    for args, message in cases.items():
        out = _ml(*args, "--profile", "e2e", "--set", f"output_dir={out_dir}")
        assert out.returncode == 2 and message in out.stderr, (args, out.stderr[-2000:])
        assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr[-2000:]
    assert not out_dir.exists() and not (tmp_path / "config.json").exists()  # nothing written, inside or out


def test_validate_is_a_step_of_a_run(tmp_path: Path, tiny_model: Path) -> None:
    """`validate --run-key` checks the run's snapshot between load and prepare: its report in the run
    folder, exit 1 when the gate fails; --data beside it is refused."""
    rows = [json.loads(line) for line in SAMPLE.read_text(encoding="utf-8").splitlines()]
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(json.dumps({**r, "LONG_ANSWER": " "} if i == 3 else r, ensure_ascii=False)
                             for i, r in enumerate(rows)), encoding="utf-8")
    runs = tmp_path / "runs"
    for key, data, code in (("good", SAMPLE, 0), ("bad", bad, 1)):
        common = ("--profile", "e2e", "--set", f"output_dir={runs}", "--set",
                  f"registry.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", "--run-key", key)
        assert _ml("load", *common, "--set", f"data.source={data}").returncode == 0
        out = _ml("validate", *common)
        assert out.returncode == code, out.stderr[-2000:]
        assert json.loads(RunPaths(runs / key).validation.read_text())["success"] is (code == 0)
    assert "failed" in out.stderr.lower() and rows[3]["PMID"] in out.stderr
    out = _ml("validate", "--profile", "e2e", "--run-key", "good", "--data", str(SAMPLE))
    assert out.returncode == 2 and "drop --data" in out.stderr


def _ml_in(cwd: Path, *args: str, unset: tuple[str, ...] = (), **env: str) -> subprocess.CompletedProcess[str]:
    """`python -m ml` from another working directory (as a user runs it), this checkout's `ml` first."""
    environ = {k: v for k, v in os.environ.items() if k not in unset}
    environ.update(env, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    return subprocess.run([sys.executable, "-m", "ml", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env=environ)


def _one_error_line(out: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert out.returncode == 2, (out.returncode, out.stderr[-2000:])
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr[-2000:]
    assert all(needle in out.stderr for needle in needles), (needles, out.stderr)


def test_registry_commands_without_a_tracking_uri_refuse_and_create_no_local_store(tmp_path: Path) -> None:
    """Neither registry.tracking_uri nor $MLFLOW_TRACKING_URI: every command that reads or writes the
    registry ends with one line naming both, exit 2, before MLflow could create ./mlflow.db or ./mlruns."""
    cwd, runs = tmp_path / "cwd", tmp_path / "runs"
    cwd.mkdir()
    common = ("--profile", "e2e", "--set", f"output_dir={runs}")
    no_uri = ("MLFLOW_TRACKING_URI",)
    # `load` touches no registry: it runs, and gives the later steps a run folder to refuse in
    assert _ml_in(cwd, "load", *common, "--run-key", "k", unset=no_uri).returncode == 0
    paths = RunPaths(runs / "k")
    paths.train.mkdir(parents=True)  # as if trained: evaluate, register, promote, keep get past their folder check
    paths.reports.mkdir(parents=True, exist_ok=True)
    commands = [("rollback", "--profile", "e2e", "--reason", "drift"),
                ("promote", "--profile", "e2e", "--version", "2", "--reason", "reviewed"),
                *[(step, *common, "--run-key", "k")
                  for step in ("validate", "evaluate", "register", "promote", "keep")],
                ("pipeline", "--profile", "e2e", "--set", f"output_dir={tmp_path / 'pipeline-runs'}")]
    for args in commands:
        _one_error_line(_ml_in(cwd, *args, unset=no_uri), "registry.tracking_uri", "MLFLOW_TRACKING_URI")
    assert list(cwd.iterdir()) == []  # no mlflow.db, no mlruns
    assert not (tmp_path / "pipeline-runs").exists()  # refused before the run folder was written
    assert not paths.validation.exists() and not paths.evaluation.exists()


def _registry_with_three_versions(db: Path, name: str) -> str:
    """A real MLflow SQLite registry: versions 1-3 of `name`, @champion on 2, @previous_champion on 1."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{db}"
    client = MlflowClient(uri, uri)
    client.create_registered_model(name)
    for _ in range(3):
        client.create_model_version(name, source=(db.parent / "model").as_uri())
    client.set_registered_model_alias(name, "champion", "2")
    client.set_registered_model_alias(name, "previous_champion", "1")
    return uri


def test_rollback_and_promote_use_the_environments_or_the_profiles_registry(tmp_path: Path) -> None:
    """The registry that holds the versions, named either way, from a working directory elsewhere."""
    from mlflow import MlflowClient

    uri = _registry_with_three_versions(tmp_path / "mlflow.db", "e2e-tiny-lora")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    out = _ml_in(cwd, "promote", "--profile", "e2e", "--version", "3", "--reason", "reviewed", MLFLOW_TRACKING_URI=uri)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout)["champion"] == "3"
    out = _ml_in(cwd, "rollback", "--profile", "e2e", "--set", f"registry.tracking_uri={uri}", "--reason", "drift",
                 unset=("MLFLOW_TRACKING_URI",))
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout)["champion"] == "2"
    client = MlflowClient(uri, uri)
    assert str(client.get_model_version_by_alias("e2e-tiny-lora", "champion").version) == "2"
    assert str(client.get_model_version_by_alias("e2e-tiny-lora", "previous_champion").version) == "3"
    assert list(cwd.iterdir()) == []


def test_profile_help_names_the_real_default(tmp_path: Path) -> None:
    out = _ml_in(tmp_path, "rollback", "--help", unset=("RETRAIN_PROFILE",))
    assert f"$RETRAIN_PROFILE if set, else {DEFAULT_PROFILE}" in " ".join(out.stdout.split()), out.stdout
    assert "seed profile" not in out.stdout
    out = _ml_in(tmp_path, "pipeline", "--help", RETRAIN_PROFILE="demo")
    assert "$RETRAIN_PROFILE (now 'demo') if set" in " ".join(out.stdout.split()), out.stdout


def _closed_port() -> int:
    with socket.socket() as s:  # bound, never listening, closed: connections to it are refused
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_an_unreachable_hub_fails_at_once_with_the_offline_message(tmp_path: Path) -> None:
    """HF_HUB_OFFLINE unset but the hub unreachable, nothing cached: the hub's tokenizer and the hub's
    dataset fail as they do offline, naming the hub, without huggingface_hub's retries (~25 s)."""
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    hub = {"HF_ENDPOINT": endpoint, "HF_HOME": str(tmp_path / "hf")}
    cases = [(("validate", "--data", str(SAMPLE), "--profile", DEFAULT_PROFILE),
              f"'{ModelConfig().base_model}' has no tokenizer.json; "),
             (("load", "--profile", DEFAULT_PROFILE, "--set", f"output_dir={tmp_path / 'runs'}"),
              f"cannot load hub dataset '{DataConfig().source}'")]
    for args, message in cases:
        unreachable = _ml_in(tmp_path, *args, unset=("HF_HUB_OFFLINE",), **hub)
        offline = _ml_in(tmp_path, *args, HF_HUB_OFFLINE="1", **hub)
        for out in (unreachable, offline):
            assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
            error = out.stderr.strip().splitlines()[-1]
            assert error.startswith(f"error: {message}") and "the local cache ($HF_HOME) has no copy" in error, error
        assert f"the hub at {endpoint} does not answer ([Errno 111] Connection refused)" in unreachable.stderr
        assert "offline ($HF_HUB_OFFLINE is set)" in offline.stderr.splitlines()[-1]
        assert "Retrying in" not in unreachable.stderr  # huggingface_hub's backoff never started


def test_a_hub_that_answers_is_used(tmp_path: Path) -> None:
    """Any HTTP answer (here a 404 of a local server) means the hub is there: no offline mode."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        code = "import os; from ml.hub import use_hub; print(use_hub(), os.environ.get('HF_HUB_OFFLINE'))"
        env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
        env.update(HF_ENDPOINT=f"http://127.0.0.1:{server.server_port}", PYTHONPATH=str(ROOT))
        out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                             timeout=60, env=env)
        assert out.stdout.split() == ["True", "None"], out.stderr[-2000:]
    finally:
        server.shutdown()
        server.server_close()
