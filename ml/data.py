"""Load a QA dataset from the hub or a local file, snapshot it, split it stably.

Every source becomes canonical records: a stable row ``key`` plus the fields
QUESTION / CONTEXTS / LONG_ANSWER with their values as the source had them, so
the data-quality gate can judge types and content before anything is coerced.
Validated records become `QAExample`s. The split is a pure function of the key,
so appending rows never moves an existing row between train, validation and test.
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

import datasets
import pandas as pd

from ml.config import CANONICAL_COLUMNS, LOCAL_SUFFIXES, DataConfig, resolve_path
from ml.errors import DataError

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


# ---------------------------------------------------------------- loading

def read_records(cfg: DataConfig) -> list[dict[str, Any]]:
    """Raw records of the source, with an ``__id__`` field where the format has one."""
    if not cfg.is_local:
        return _read_hub(cfg)
    path = resolve_path(cfg.source)
    if not path.exists():
        raise DataError(f"dataset file not found: {path}")
    if path.is_dir() and not any((path / f).exists() for f in ("dataset_dict.json", "state.json")):
        return _read_hub(cfg, str(path))  # a dataset repository's files (a hub clone): the hub's loader
    if path.is_dir():
        try:
            ds = datasets.load_from_disk(str(path))
        except Exception as exc:  # datasets raises several types for a bad folder
            raise DataError(f"{path} is not a datasets save_to_disk folder: {exc}") from exc
        if hasattr(ds, "keys"):  # a DatasetDict
            if cfg.split not in ds:
                raise DataError(f"split {cfg.split!r} not in {path} (has {list(ds.keys())})")
            ds = ds[cfg.split]
        return [dict(r) for r in ds]
    try:
        if path.suffix == ".jsonl":
            return _from_jsonl(path)
        if path.suffix == ".json":
            return _records(_from_json(_parse(path.read_text(encoding="utf-8-sig"), f"{path}"), path), path)
        if path.suffix == ".parquet":
            return [dict(r) for r in pd.read_parquet(path).to_dict(orient="records")]
        if path.suffix == ".csv":
            return [dict(r) for r in pd.read_csv(path, keep_default_na=False).to_dict(orient="records")]
    except DataError:
        raise
    except (json.JSONDecodeError, UnicodeDecodeError, OSError, ValueError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc
    raise DataError(f"unsupported dataset file {path}: expected one of {', '.join(LOCAL_SUFFIXES)}, "
                    "a save_to_disk folder or a dataset repository's folder")


def _parse(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{where}: not JSON: {exc.msg} (column {exc.colno})") from exc
    except RecursionError as exc:
        raise DataError(f"{where}: JSON nested too deeply to be a record") from exc


def _from_jsonl(path: Path) -> list[dict[str, Any]]:
    """One JSON object per line; a bad line is named by its number in the file. A UTF-8 BOM is
    accepted, as in every other format."""
    rows = []
    with path.open(encoding="utf-8-sig") as fh:
        for number, line in enumerate(fh, start=1):
            if line.strip():
                rows.append((number, _parse(line.rstrip("\r\n"), f"{path}, line {number}")))
    return _records([row for _, row in rows], path, [f"line {n}" for n, _ in rows])


def _records(rows: list[Any], path: Path, names: list[str] | None = None) -> list[dict[str, Any]]:
    """Every row must be a JSON object whose text is valid Unicode (`\\ud800` alone is not)."""
    for i, row in enumerate(rows):
        where = names[i] if names else f"record {i + 1}"
        if not isinstance(row, dict):
            raise DataError(f"{path}, {where}: expected a JSON object (a record), got {type(row).__name__}")
        try:
            json.dumps(row, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as exc:
            raise DataError(f"{path}, {where}: text that is not valid Unicode (a lone surrogate escape "
                            f"such as \\ud800)") from exc
    return rows


def _from_json(obj: Any, path: Path) -> list[Any]:
    if isinstance(obj, list):
        return obj
    # PubMedQA PQA-L: {"PMID": {QUESTION, CONTEXTS, LONG_ANSWER, ...}, ...}
    if isinstance(obj, dict) and obj and all(isinstance(v, dict) for v in obj.values()):
        return [{"__id__": str(k), **v} for k, v in obj.items()]
    raise DataError(f"{path}: expected a JSON list of records or a dict of records keyed by id")


def _read_hub(cfg: DataConfig, source: str | None = None) -> list[dict[str, Any]]:
    """A dataset repository (a hub id, or its files in a folder) through `datasets`' own loader.

    The split is checked against the repository's before any data is read: a lone file's split
    is named after the file (`pubmedQA_test_translated.json` -> `test`)."""
    source = source or cfg.source
    datasets.disable_progress_bars()  # per-file bars flood task logs; this line and the row count say enough
    log.info("loading %s (split=%s, revision=%s) with the Hugging Face datasets loader",
             source, cfg.split, cfg.revision)
    try:
        splits = datasets.get_dataset_split_names(source, revision=cfg.revision)
    except Exception as exc:  # offline, missing repository, unreadable files: all surface here
        raise DataError(f"cannot load hub dataset {cfg.source!r} (split {cfg.split!r}): {exc}") from exc
    if cfg.split not in splits:
        raise DataError(f"dataset {cfg.source!r} has no split {cfg.split!r}; its splits: {', '.join(splits)} "
                        "(set data.split)")
    try:
        ds = datasets.load_dataset(source, split=cfg.split, revision=cfg.revision)
    except Exception as exc:
        raise DataError(f"cannot load hub dataset {cfg.source!r} (split {cfg.split!r}): {exc}") from exc
    return [dict(r) for r in ds]


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


def load_records(cfg: DataConfig) -> list[dict[str, Any]]:
    return canonical_records(read_records(cfg), cfg)


def load_examples(cfg: DataConfig) -> list[QAExample]:
    return [to_example(r) for r in load_records(cfg)]


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
    return _read_lines(out_dir / "snapshot.jsonl")


def snapshot(cfg: DataConfig, out_dir: Path) -> Snapshot:
    """Load the source and freeze its canonical records, so later steps and reruns see the same rows."""
    records = load_records(cfg)
    path = out_dir / "snapshot.jsonl"
    _write_lines(records, path)
    snap = Snapshot(str(path), fingerprint(records), len(records), cfg.source)
    (out_dir / "snapshot.json").write_text(json.dumps(asdict(snap), indent=2))
    log.info("snapshot of %s: %d rows, fingerprint %s", cfg.source, snap.rows, snap.fingerprint[:12])
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
        write_jsonl(rows, out_dir / f"{name}.jsonl")
    counts = {name: len(rows) for name, rows in parts.items()}
    log.info("split: %s", ", ".join(f"{k}={v}" for k, v in counts.items()))
    return counts


def read_split(splits_dir: Path, name: str) -> list[QAExample]:
    return read_jsonl(splits_dir / f"{name}.jsonl")
