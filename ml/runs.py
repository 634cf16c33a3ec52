"""The run folder: where each step of one pipeline run reads and writes its files.

Steps share nothing but this folder (named after the run key, e.g. the Airflow run id), so a
retried task repeats only its own step, and a worker that shares the folder can run any step.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ml.config import PipelineConfig, resolve_path
from ml.errors import ConfigError


@dataclass(frozen=True)
class RunPaths:
    root: Path

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def splits(self) -> Path:
        return self.root / "splits"

    @property
    def train(self) -> Path:
        return self.root / "train"

    @property
    def reports(self) -> Path:
        return self.root / "reports"

    @property
    def champion(self) -> Path:
        return self.root / "champion"


def run_paths(cfg: PipelineConfig, run_key: str) -> RunPaths:
    """The run's folder: a direct child of `output_dir`, whatever the key (`..` cannot climb out)."""
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", run_key).strip("_")
    if not safe or safe.startswith("."):
        raise ConfigError(f"run key {run_key!r} does not name a folder inside output_dir: use letters, digits, "
                          "'_', '-' and '.', not starting with '.'")
    return RunPaths(resolve_path(cfg.output_dir) / safe)


def write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, ensure_ascii=False, indent=2), encoding="utf-8")


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))
