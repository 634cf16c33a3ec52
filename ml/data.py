"""The records of a QA dataset in canonical form, their snapshot, and the stable split.

Every source (ml/sources.py reads them) becomes canonical records: a stable row
``key`` plus the fields QUESTION / CONTEXTS / LONG_ANSWER with their values as the
source had them, so the data-quality gate can judge types and content before
anything is coerced. Validated records become `QAExample`s. The split is a pure
function of the key, so appending rows never moves an existing row between train,
validation and test.

This module imports neither `datasets` nor pandas: the gate, the trainer's data
and the scoring read run folders through it without paying for a loader they do
not use.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ml.config import CANONICAL_COLUMNS, DataConfig
from ml.errors import DataError
from ml.runs import SNAPSHOT, SNAPSHOT_ROWS, split_file

log = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
DECISION = "final_decision"  # the canonical name of the decision column (data.decision_column)
DECISIONS = ("yes", "no", "maybe")


@dataclass(frozen=True)
class QAExample:
    key: str
    question: str
    contexts: tuple[str, ...]
    answer: str
    decision: str | None = None  # yes/no/maybe, where the profile names a decision column

    def target(self, lead_with_decision: bool = False) -> str:
        """What the model learns to answer: the long answer, led by the decision if asked ("Yes. ...")."""
        return f"{self.decision.capitalize()}. {self.answer}" if lead_with_decision and self.decision else self.answer

    def to_json(self) -> dict[str, Any]:
        row = {"key": self.key, "QUESTION": self.question, "CONTEXTS": list(self.contexts), "LONG_ANSWER": self.answer}
        return {**row, DECISION: self.decision} if self.decision is not None else row

    @classmethod
    def from_json(cls, row: dict[str, Any]) -> QAExample:
        return cls(row["key"], row["QUESTION"], tuple(row["CONTEXTS"]), row["LONG_ANSWER"], row.get(DECISION))


@dataclass(frozen=True)
class Snapshot:
    path: str
    fingerprint: str
    rows: int
    source: str


# ---------------------------------------------------------------- canonical form

def normalize_question(text: str) -> str:
    """Case, width and punctuation-insensitive form used for row keys and duplicates."""
    text = unicodedata.normalize("NFKC", text).lower()
    return re.sub(r"[\W_]+", " ", text).strip()


def _plain(value: Any) -> Any:
    """numpy/pandas values -> JSON-able Python values; everything else untouched."""
    if hasattr(value, "tolist") and not isinstance(value, str):
        return value.tolist()  # numpy arrays (parquet list columns) and numpy scalars
    if isinstance(value, float) and value != value:  # NaN: a missing value
        return None
    return value


def _contexts_value(value: Any) -> Any:
    value = _plain(value)
    # CSV and some exports store the list JSON-encoded.
    if isinstance(value, str) and value.startswith("[") and value.endswith("]"):
        try:
            decoded = json.loads(value)
        except json.JSONDecodeError:
            return value
        return decoded if isinstance(decoded, list) else value
    return value


def canonical_records(records: Sequence[dict[str, Any]], cfg: DataConfig) -> list[dict[str, Any]]:
    """{key, QUESTION, CONTEXTS, LONG_ANSWER} per row, values as the source had them."""
    if not records:
        raise DataError(f"dataset {cfg.source!r} has no rows")
    mapping = {c: cfg.columns.get(c, c) for c in CANONICAL_COLUMNS}
    if cfg.decision_column:
        mapping[DECISION] = cfg.decision_column
    missing = [f"{canon} (as {src!r})" if src != canon else canon
               for canon, src in mapping.items() if src not in records[0]]
    if missing:
        raise DataError(f"dataset {cfg.source!r} lacks column(s) {', '.join(missing)}; it has "
                        f"{sorted(records[0])}. Map them with data.columns (the decision: data.decision_column).")
    if cfg.id_column and cfg.id_column not in records[0] and "__id__" not in records[0]:
        raise DataError(f"id column {cfg.id_column!r} not in dataset {cfg.source!r}")
    out = []
    for rec in records:
        q = _plain(rec.get(mapping["QUESTION"]))
        if cfg.id_column and _plain(rec.get(cfg.id_column)) not in (None, ""):
            key = str(_plain(rec[cfg.id_column]))
        elif "__id__" in rec:
            key = str(rec["__id__"])
        else:
            key = "q-" + hashlib.sha256(normalize_question(str(q or "")).encode()).hexdigest()[:16]
        row = {"key": key, "QUESTION": q, "CONTEXTS": _contexts_value(rec.get(mapping["CONTEXTS"])),
               "LONG_ANSWER": _plain(rec.get(mapping["LONG_ANSWER"]))}
        if cfg.decision_column:
            row[DECISION] = _plain(rec.get(cfg.decision_column))
        out.append(row)
    return out


def to_example(record: dict[str, Any]) -> QAExample:
    """A validated canonical record as the typed example the model sees."""
    ctx = record["CONTEXTS"]
    contexts = () if ctx is None else (ctx,) if isinstance(ctx, str) else tuple(str(c) for c in ctx)
    decision = record.get(DECISION)
    return QAExample(record["key"], str(record["QUESTION"] or ""), contexts, str(record["LONG_ANSWER"] or ""),
                     None if decision is None else str(decision).strip().lower())


# ---------------------------------------------------------------- snapshot

def fingerprint(records: Sequence[dict[str, Any]]) -> str:
    """Content hash of the canonical records in order (sha256, hex)."""
    h = hashlib.sha256()
    for rec in records:
        h.update(json.dumps(rec, ensure_ascii=False, sort_keys=True, default=str).encode())
        h.update(b"\n")
    return h.hexdigest()


def _unsupported(value: Any) -> dict[str, str]:
    """A value JSON cannot hold (bytes, dates, ...) is written as what it is, not as its text
    ("b'...'" would pass the gate's type checks that the source itself fails)."""
    return {"unsupported_type": type(value).__name__}


def _write_lines(rows: Iterable[dict[str, Any]], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False, default=_unsupported) + "\n")
    tmp.replace(path)  # readers never see a half-written file


def _read_lines(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def write_jsonl(examples: Iterable[QAExample], path: Path) -> None:
    _write_lines((ex.to_json() for ex in examples), path)


def read_jsonl(path: Path) -> list[QAExample]:
    return [QAExample.from_json(row) for row in _read_lines(path)]


def read_snapshot(out_dir: Path) -> list[dict[str, Any]]:
    return _read_lines(out_dir / SNAPSHOT_ROWS)


def write_snapshot(records: Sequence[dict[str, Any]], source: str, out_dir: Path) -> Snapshot:
    """Freeze canonical records, so later steps and reruns see the same rows (ml/sources.py loads them)."""
    path = out_dir / SNAPSHOT_ROWS
    _write_lines(records, path)
    snap = Snapshot(str(path), fingerprint(records), len(records), source)
    (out_dir / SNAPSHOT).write_text(json.dumps(asdict(snap), indent=2))
    log.info("snapshot of %s: %d rows, fingerprint %s", source, snap.rows, snap.fingerprint[:12])
    return snap


# ---------------------------------------------------------------- split

def assign_split(key: str, val_fraction: float, test_fraction: float) -> str:
    """Deterministic bucket from the row key alone: appends never move old rows."""
    u = int(hashlib.sha256(key.encode()).hexdigest()[:12], 16) / float(16**12)
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "validation"
    return "train"


def split_examples(examples: Sequence[QAExample], cfg: DataConfig) -> dict[str, list[QAExample]]:
    keys = [ex.key for ex in examples]
    if len(set(keys)) != len(keys):
        dupes = sorted({k for k in keys if keys.count(k) > 1})[:5]
        raise DataError(f"row keys are not unique (e.g. {dupes}); the split needs a stable unique key")
    parts: dict[str, list[QAExample]] = {s: [] for s in SPLITS}
    for ex in examples:
        parts[assign_split(ex.key, cfg.val_fraction, cfg.test_fraction)].append(ex)
    empty = [s for s in SPLITS if not parts[s] and (s != "validation" or cfg.val_fraction > 0)]
    if empty:
        raise DataError(f"split(s) {empty} are empty with {len(examples)} rows; "
                        "use more data or larger fractions")
    return parts


def write_splits(parts: dict[str, list[QAExample]], out_dir: Path) -> dict[str, int]:
    for name, rows in parts.items():
        write_jsonl(rows, split_file(out_dir, name))
    counts = {name: len(rows) for name, rows in parts.items()}
    log.info("split: %s", ", ".join(f"{k}={v}" for k, v in counts.items()))
    return counts


def read_split(splits_dir: Path, name: str) -> list[QAExample]:
    return read_jsonl(split_file(splits_dir, name))
