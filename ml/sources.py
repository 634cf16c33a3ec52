"""Read a QA dataset: a hub repository, its files in a folder, a save_to_disk folder, or a file
(JSONL, JSON, Parquet, CSV); freeze it as the run's snapshot.

The readers return raw records; ml/data.py turns them into canonical ones. `datasets` is
imported where a hub repository or a save_to_disk folder is read, not for a file: it is
the slowest import of the pipeline's own process (docs/benchmarks.md), which reads files.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pandas as pd

from ml.config import LOCAL_SUFFIXES, DataConfig, resolve_path
from ml.data import QAExample, Snapshot, canonical_records, to_example, write_snapshot
from ml.errors import DataError

log = logging.getLogger(__name__)


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
        import datasets

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
    import datasets

    from ml.hub import offline_note  # httpx and huggingface_hub: not for a file

    source = source or cfg.source
    # an unreachable hub: the local cache answers at once, not after retries per file
    offline = offline_note() if not cfg.is_local else ""
    datasets.disable_progress_bars()  # per-file bars flood task logs; this line and the row count say enough
    log.info("loading %s (split=%s, revision=%s) with the Hugging Face datasets loader",
             source, cfg.split, cfg.revision)
    try:
        splits = datasets.get_dataset_split_names(source, revision=cfg.revision)
    except Exception as exc:  # offline, missing repository, unreadable files: all surface here
        raise DataError(f"cannot load hub dataset {cfg.source!r} (split {cfg.split!r}): {exc}{offline}") from exc
    if cfg.split not in splits:
        raise DataError(f"dataset {cfg.source!r} has no split {cfg.split!r}; its splits: {', '.join(splits)} "
                        "(set data.split)")
    try:
        ds = datasets.load_dataset(source, split=cfg.split, revision=cfg.revision)
    except Exception as exc:
        raise DataError(f"cannot load hub dataset {cfg.source!r} (split {cfg.split!r}): {exc}{offline}") from exc
    return [dict(r) for r in ds]


def load_records(cfg: DataConfig) -> list[dict[str, Any]]:
    return canonical_records(read_records(cfg), cfg)


def load_examples(cfg: DataConfig) -> list[QAExample]:
    return [to_example(r) for r in load_records(cfg)]


def snapshot(cfg: DataConfig, out_dir: Path) -> Snapshot:
    """Load the source and freeze its canonical records, so later steps and reruns see the same rows."""
    return write_snapshot(load_records(cfg), cfg.source, out_dir)
