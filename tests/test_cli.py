"""`python -m ml`: each step without Airflow, and the validate exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import ROOT, SAMPLE

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
