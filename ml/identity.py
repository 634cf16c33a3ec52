"""What a score depends on, as short content hashes: base weights, tokenizer, adapter, rows.

A name is not an identity: a base model folder rebuilt under the same path, a hub id whose
revision moved, an adapter folder rewritten by a re-run under the same key, or a row whose
question was edited (and so re-keyed) all keep their names. These hashes are recorded on every
registered version and checked before its scores are compared or its alias moves.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ml.config import PipelineConfig, project_root
from ml.data import QAExample, normalize_question

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt")
_CACHE = ".weights-sha256.json"  # per-file hashes of a local base, reused while size and mtime hold


def _short(h: Any) -> str:
    return str(h.hexdigest()[:16])


def _file_sha(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def local_weights_hash(folder: Path) -> str:
    """A hash of a local model's weight files (16 GB take a while to read, so the files are hashed
    in parallel, and per-file hashes are cached beside them while each file's size and mtime hold)."""
    cache_file = folder / _CACHE
    try:
        cache = json.loads(cache_file.read_text()) if cache_file.exists() else {}
    except (OSError, json.JSONDecodeError):
        cache = {}

    def entry(f: Path) -> tuple[str, list[Any]]:
        stat, name = f.stat(), str(f.relative_to(folder))
        known = cache.get(name)
        sha = known[2] if known and known[:2] == [stat.st_size, stat.st_mtime_ns] else _file_sha(f)
        return name, [stat.st_size, stat.st_mtime_ns, sha]

    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:  # hashlib releases the GIL
        fresh = dict(pool.map(entry, files))
    h = hashlib.sha256()
    for name, (_, _, sha) in fresh.items():
        h.update(f"{name}\0{sha}\n".encode())
    if fresh != cache:
        try:
            cache_file.write_text(json.dumps(fresh))
        except OSError:  # a read-only model folder: hash again next time
            pass
    return "sha256:" + _short(h)


def base_identity(name: str, folder: str | None, commit: str | None, revision: str | None) -> str:
    """A local base: the hash of its weights. A hub base: its id at the commit it resolved to
    (`config._commit_hash` of the loaded model), else at the requested revision."""
    if folder and Path(folder).is_dir():
        return local_weights_hash(Path(folder))
    return f"{name}@{commit or revision or 'unresolved'}"


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Vocabulary, merges, normalisation, special tokens and chat template: whatever changes token ids."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    extra = json.dumps([tokenizer.all_special_tokens, getattr(tokenizer, "chat_template", None)], ensure_ascii=False)
    return _short(hashlib.sha256((body + extra).encode()))


def adapter_hash(adapter_dir: Path) -> str:
    """The adapter's files (weights and config), by content."""
    h = hashlib.sha256()
    for f in sorted(p for p in adapter_dir.rglob("*") if p.is_file()):
        h.update(f"{f.relative_to(adapter_dir)}\0{_file_sha(f)}\n".encode())
    return "sha256:" + _short(h)


def _text_hash(text: str) -> str:
    return _short(hashlib.sha256(" ".join(text.split()).encode()))


def row_hashes(examples: Iterable[QAExample]) -> dict[str, list[str]]:
    """Content hashes of rows, by what they say, not their key: `question` (normalised) and
    `answer`. A test row matches a training row when either is equal, so an edited question
    (a new key) or a re-keyed dataset still finds the row it was."""
    rows = list(examples)
    return {"question": sorted({_text_hash(normalize_question(ex.question)) for ex in rows}),
            "answer": sorted({_text_hash(ex.answer) for ex in rows})}


def trained_on(test: Sequence[QAExample], trained: dict[str, list[str]]) -> set[str]:
    """Keys of the test rows whose question or answer is among `trained` (a `row_hashes` record)."""
    questions, answers = set(trained.get("question", ())), set(trained.get("answer", ()))
    return {ex.key for ex in test
            if _text_hash(normalize_question(ex.question)) in questions or _text_hash(ex.answer) in answers}


def keys_hash(keys: Iterable[str]) -> str:
    return _short(hashlib.sha256("\n".join(sorted(keys)).encode()))


def config_hash(cfg: PipelineConfig) -> str:
    """The training settings (ml.config `ROLES`) as a short hash: equal hashes train the same way."""
    body = json.dumps(cfg.training_settings(), sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()[:16]


def code_commit() -> str | None:
    """The project's git commit, where it is a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=project_root(), capture_output=True,
                             text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None
