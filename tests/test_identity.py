"""Identities of what a score depends on: a local base model's weights, hashed by content."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ml.identity import base_identity, local_weights_hash


def _folder(tmp_path: Path) -> Path:
    folder = tmp_path / "base"
    (folder / "sub").mkdir(parents=True)
    (folder / "model-00001-of-00002.safetensors").write_bytes(b"a" * 5000)
    (folder / "model-00002-of-00002.safetensors").write_bytes(b"b" * 7000)
    (folder / "sub" / "extra.bin").write_bytes(b"c" * 10)
    (folder / "config.json").write_text("{}")  # not a weight file
    return folder


def test_the_weights_hash_is_every_weight_file_by_name_and_content(tmp_path: Path) -> None:
    folder = _folder(tmp_path)
    expected = hashlib.sha256()
    for name in sorted(["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "sub/extra.bin"]):
        expected.update(f"{name}\0{hashlib.sha256((folder / name).read_bytes()).hexdigest()}\n".encode())
    assert local_weights_hash(folder) == "sha256:" + expected.hexdigest()[:16]
    assert base_identity("my-base", str(folder), None, None) == local_weights_hash(folder)

    before = local_weights_hash(folder)
    (folder / "config.json").write_text('{"changed": true}')
    assert local_weights_hash(folder) == before  # only weights count
    (folder / "model-00002-of-00002.safetensors").write_bytes(b"B" * 7000)
    assert local_weights_hash(folder) != before


def test_per_file_hashes_are_reused_while_size_and_mtime_hold(tmp_path: Path) -> None:
    folder = _folder(tmp_path)
    first = local_weights_hash(folder)
    cache_file = folder / ".weights-sha256.json"
    cache = json.loads(cache_file.read_text())
    assert set(cache) == {"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "sub/extra.bin"}
    cache["sub/extra.bin"][2] = "0" * 64  # a cached entry is trusted while size and mtime match
    cache_file.write_text(json.dumps(cache))
    assert local_weights_hash(folder) != first
    (folder / "sub" / "extra.bin").write_bytes(b"c" * 10)  # rewritten, a new mtime: hashed again
    assert local_weights_hash(folder) == first


def test_a_hub_base_is_named_by_the_commit_it_resolved_to() -> None:
    assert base_identity("org/model", None, "abc123", "main") == "org/model@abc123"
    assert base_identity("org/model", None, None, "v1") == "org/model@v1"
