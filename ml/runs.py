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
    def layout(self) -> Path:
        """How the training was laid out before step 1: the activation layout (ml.speed.Layout), the backend, the
        processes and their batch split (ml.distributed.BatchSplit); the train step logs it as params."""
        return self.root / "memory_layout.json"

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
    def key(self) -> str:
        """The run key this folder was named after (`run_folder_name`)."""
        return run_key_of(self.root.name)

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


MAX_FOLDER_NAME = 255  # bytes: the longest file name of ext4, xfs and most others
UNSAFE_IN_KEY = re.compile(r"['\"`\\]|[\x00-\x1f\x7f]")  # break MLflow's filter strings, or unprintable
SAFE_IN_FOLDER = re.compile(r"[A-Za-z0-9_.-]")
_ESCAPED = re.compile(rb"=([0-9A-F]{2})")


def run_folder_name(run_key: str) -> str:
    """The run key as a folder name, one to one: letters, digits, '_', '-' and '.' stay, any other
    character becomes '=' and the hex of its UTF-8 bytes ('=' too), so no two keys share a folder
    (`col a`, `col_a`; Airflow run ids that differ only in ':', '+' or '~') and the key is read back
    from the name (`RunPaths.key`). Not '%': MLflow reads a local artifact path as a URI and would
    decode it. Refuses a key that MLflow's filter strings cannot quote or a file system cannot name."""
    bad = UNSAFE_IN_KEY.search(run_key)
    if not run_key or bad:
        raise ConfigError(f"run key {run_key!r} cannot name a run: it must be non-empty, without quotes, "
                          "backslashes or control characters" + (f" (found {bad.group()!r})" if bad else ""))
    name = "".join(ch if SAFE_IN_FOLDER.fullmatch(ch) else "".join(f"={b:02X}" for b in ch.encode())
                   for ch in run_key)
    if name.startswith("."):  # "." and ".." are not folders of their own, ".x" would hide
        name = "=2E" + name[1:]
    if len(name.encode()) > MAX_FOLDER_NAME:
        raise ConfigError(f"run key {run_key[:40]!r}... is too long: {len(name)} characters as a folder name, "
                          f"at most {MAX_FOLDER_NAME} (a character other than letters, digits, '_', '-' and '.' "
                          "counts three per UTF-8 byte)")
    return name


def run_key_of(folder_name: str) -> str:
    """The run key a folder was named after (`run_folder_name` undone)."""
    return _ESCAPED.sub(lambda m: bytes([int(m.group(1), 16)]), folder_name.encode()).decode()


def run_paths(cfg: PipelineConfig, run_key: str) -> RunPaths:
    """The run's folder: a direct child of `output_dir` named after the key (`run_folder_name`)."""
    return RunPaths(resolve_path(cfg.output_dir) / run_folder_name(run_key))


def write_json(path: Path, obj: Any) -> None:
    """Whole or not at all: a step killed while writing leaves the earlier file (or none), never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(path.name + ".part")
    part.write_text(json.dumps(obj, ensure_ascii=False, indent=2), encoding="utf-8")
    part.replace(path)


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))
