"""The run folder: where each step of one pipeline run reads and writes its files.

Steps share nothing but this folder (named after the run key, e.g. the Airflow run id), so a
retried task repeats only its own step, and a worker that shares the folder can run any step.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ml.config import PipelineConfig, resolve_path
from ml.errors import ConfigError

TRAIN_METRICS = "metrics.jsonl"  # in train/: what the trainer logs as it trains, a JSON line a record


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

    @property
    def scores(self) -> Path:
        """Challenger and comparator scored on the test split (ml/scoring.py)."""
        return self.reports / "scores.json"


@dataclass(frozen=True)
class Champion:
    """The champion a run competes with, as fetched from the registry into the run folder."""
    version: str
    run_id: str | None
    model_dir: str  # downloaded pyfunc folder
    adapter_dir: str
    base_model: str  # as configured when it was trained (hub id or path)
    base_path: str | None  # the base weights shipped inside the model, if any
    base_identity: str | None  # what the base was when it trained (ml.identity.base_identity)
    prompt_format: dict[str, Any] | None  # the prompt settings it was trained and logged with
    trained_rows: dict[str, list[str]] | None  # content hashes of its training rows (ml.identity.row_hashes)


CHAMPION_FILE = "champion.json"  # in RunPaths.champion: {"champion": <Champion> or null}


def write_champion(folder: Path, champ: Champion | None) -> None:
    """Record which champion (or none: the base model) was fetched into `folder`."""
    write_json(folder / CHAMPION_FILE, {"champion": asdict(champ) if champ else None})


def read_champion(folder: Path) -> tuple[bool, Champion | None]:
    """(fetched, champion): whether a champion record is in `folder`, and the champion it names."""
    path = folder / CHAMPION_FILE
    if not path.exists():
        return False, None
    record = read_json(path)["champion"]
    return True, Champion(**record) if record else None


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
