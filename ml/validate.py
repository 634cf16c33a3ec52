"""Data-quality gate that runs before any GPU time.

The seam the DAG and `python -m ml validate` call: `validate(examples, cfg)`
returns a report with one entry per check, and `report.success` decides
whether the run goes on. These first checks are structural; the full Great
Expectations suite plugs in behind the same function.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ml.config import PipelineConfig
from ml.data import QAExample, normalize_question


@dataclass(frozen=True)
class CheckResult:
    name: str
    success: bool
    message: str
    examples: list[str] = field(default_factory=list)  # offending row keys


@dataclass(frozen=True)
class ValidationReport:
    success: bool
    rows: int
    checks: list[CheckResult]

    @property
    def failures(self) -> list[CheckResult]:
        return [c for c in self.checks if not c.success]

    def summary(self) -> str:
        if self.success:
            return f"data-quality gate passed: {len(self.checks)} checks on {self.rows} rows"
        lines = [f"data-quality gate FAILED ({len(self.failures)} of {len(self.checks)} checks) on {self.rows} rows:"]
        lines += [f"  - {c.name}: {c.message}" + (f" (rows {', '.join(c.examples)})" if c.examples else "")
                  for c in self.failures]
        return "\n".join(lines)

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), ensure_ascii=False, indent=2), encoding="utf-8")


def _check(name: str, bad: Sequence[QAExample], message: str) -> CheckResult:
    return CheckResult(name, not bad, f"{len(bad)} rows {message}" if bad else "ok",
                       [ex.key for ex in bad[:5]])


def validate(examples: Sequence[QAExample], cfg: PipelineConfig) -> ValidationReport:
    seen: dict[str, str] = {}
    dupes = []
    for ex in examples:
        norm = normalize_question(ex.question)
        if norm in seen:
            dupes.append(ex)
        seen.setdefault(norm, ex.key)
    checks = [
        CheckResult("row_count", len(examples) >= 10, f"{len(examples)} rows (need at least 10)"),
        _check("question_not_empty", [e for e in examples if not e.question.strip()], "have an empty QUESTION"),
        _check("answer_not_empty", [e for e in examples if not e.answer.strip()], "have an empty LONG_ANSWER"),
        _check("question_unique", dupes, "repeat an earlier QUESTION"),
    ]
    return ValidationReport(all(c.success for c in checks), len(examples), checks)
