"""The run folder: where each step of one pipeline run reads and writes its files, all named here.

Steps share nothing but this folder (named after the run key, e.g. the Airflow run id), so a
retried task repeats only its own step, and a worker that shares the folder can run any step.

    config.json                 the run's effective config, frozen by its first step
    data/snapshot.jsonl, .json  the rows as loaded, and their fingerprint
    splits/<split>.jsonl        train, validation, test
    champion/                   the champion it competes with, as fetched (champion.json says which)
    train/                      what the trainer writes (`TrainFiles`): adapter, result, curve, checkpoints
    reports/                    validation, splits, scores, evaluation, train rows, links, registered,
                                the review card, a person's answer to an approval request
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ml.config import PipelineConfig, resolve_path
from ml.errors import ConfigError

SNAPSHOT_ROWS, SNAPSHOT = "snapshot.jsonl", "snapshot.json"  # in data/
CHAMPION_FILE = "champion.json"  # in champion/: {"champion": <Champion> or null}


def split_file(folder: Path, name: str) -> Path:
    """A split's rows (train, validation, test) in a splits folder, a JSON line a row."""
    return folder / f"{name}.jsonl"


@dataclass(frozen=True)
class TrainFiles:
    """What the trainer writes in its output folder: a run's train/, or any folder given to it."""
    root: Path

    @property
    def adapter(self) -> Path:
        return self.root / "adapter"

    @property
    def result(self) -> Path:
        """The summary (ml.train.TrainResult)."""
        return self.root / "train_result.json"

    @property
    def history(self) -> Path:
        """transformers' log history, a JSON list."""
        return self.root / "log_history.json"

    @property
    def metrics(self) -> Path:
        """Each logged record as a JSON line, appended while training: what the train step relays to MLflow."""
        return self.root / "metrics.jsonl"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"


@dataclass(frozen=True)
class RunPaths:
    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.json"

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def snapshot(self) -> Path:
        """The snapshot's record: source, rows, fingerprint (ml.data.Snapshot)."""
        return self.data / SNAPSHOT

    @property
    def splits(self) -> Path:
        return self.root / "splits"

    def split(self, name: str) -> Path:
        return split_file(self.splits, name)

    @property
    def champion(self) -> Path:
        return self.root / "champion"

    @property
    def train(self) -> Path:
        return self.root / "train"

    @property
    def trained(self) -> TrainFiles:
        return TrainFiles(self.train)

    @property
    def reports(self) -> Path:
        return self.root / "reports"

    @property
    def validation(self) -> Path:
        """The gate's GX validation result (an HTML page beside it)."""
        return self.reports / "validation.json"

    @property
    def split_counts(self) -> Path:
        return self.reports / "splits.json"

    @property
    def scores(self) -> Path:
        """Challenger and comparator scored on the test split (ml/scoring.py)."""
        return self.reports / "scores.json"

    @property
    def evaluation(self) -> Path:
        """The scores that were judged and the decision (ml/evaluation.py)."""
        return self.reports / "evaluation.json"

    @property
    def train_rows(self) -> Path:
        """Content hashes of the training rows (ml.identity.row_hashes)."""
        return self.reports / "train_rows.json"

    @property
    def links(self) -> Path:
        """Where the run can be seen (the Airflow run, its task logs), for the review card."""
        return self.reports / "links.json"

    @property
    def card(self) -> Path:
        """The version's review card as register wrote it (markdown): what an approver reads."""
        return self.reports / "review_card.md"

    @property
    def review(self) -> Path:
        """A person's answer to the approval request (ml.promotion.Review)."""
        return self.reports / "review.json"

    @property
    def registered(self) -> Path:
        """The MLflow run and model version register wrote (ml.registry.Registered)."""
        return self.reports / "registered.json"


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
