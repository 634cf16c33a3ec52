"""`python -m ml`: each step without Airflow, and the validate exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import ROOT, SAMPLE


def _ml(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ml", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def test_help_lists_every_step() -> None:
    out = _ml("--help")
    assert out.returncode == 0
    for step in ("validate", "load", "prepare", "train", "evaluate", "register", "promote", "pipeline",
                 "tiny-model"):
        assert step in out.stdout


def test_validate_passes_on_the_sample(tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    out = _ml("validate", "--data", str(SAMPLE), "--profile", "demo", "--report", str(report))
    assert out.returncode == 0, out.stderr
    assert json.loads(report.read_text())["success"] is True


def test_validate_fails_the_gate_with_named_checks(tmp_path: Path) -> None:
    lines = SAMPLE.read_text(encoding="utf-8").splitlines()
    rows = [json.loads(line) for line in lines[:20]]
    rows[3]["LONG_ANSWER"] = "   "
    rows[5]["QUESTION"] = rows[4]["QUESTION"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows), encoding="utf-8")
    out = _ml("validate", "--data", str(bad), "--profile", "demo")
    assert out.returncode == 1
    assert "answer_not_empty" in out.stdout and rows[3]["PMID"] in out.stdout
    assert "question_unique" in out.stdout and rows[5]["PMID"] in out.stdout


def test_validate_unusable_input_exits_2(tmp_path: Path) -> None:
    assert _ml("validate", "--data", str(tmp_path / "absent.jsonl")).returncode == 2
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text('{"question": "q"}\n')
    out = _ml("validate", "--data", str(wrong))
    assert out.returncode == 2 and "QUESTION" in out.stderr
    assert _ml("validate", "--data", str(SAMPLE), "--profile", "nope").returncode == 2
