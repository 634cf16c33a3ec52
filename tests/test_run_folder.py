"""A run folder holds one run: named one to one after its run key, made for one config and one
snapshot. A key reused with other settings or other data is refused before anything is written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import SAMPLE

from ml import pipeline
from ml.config import load_config
from ml.errors import ConfigError, DataError
from ml.runs import read_json, run_paths

KEYS = ["col a", "col_a", "col%20a", "retrain_lora__manual__2026-12-06T19:30:00+00:00",
        "retrain_lora__manual__2026-12-06T19_30_00_00_00", "retrain_lora__manual__2026-12-06T19:30:00~00:00",
        "..", ".", "%2E.", "a/b", "a/../b", "질문 1"]


def test_run_keys_name_folders_one_to_one_and_are_read_back(tmp_path: Path) -> None:
    cfg = load_config("e2e", {"output_dir": str(tmp_path)})
    folders = [run_paths(cfg, key) for key in KEYS]
    assert len({p.root for p in folders}) == len(KEYS)
    for key, paths in zip(KEYS, folders, strict=True):
        assert paths.root.parent == tmp_path and paths.key == key
        paths.root.mkdir()  # a name the file system takes, inside output_dir
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.root.name for p in folders)


@pytest.mark.parametrize(("key", "message"), [
    ("", "non-empty"), ("it's", "found \"'\""), ('say "x"', "without quotes"), ("a\\b", "backslashes"),
    ("line\nbreak", "control characters"), ("k" * 300, "is too long: 300 characters"),
    ("é" * 100, "is too long: 600 characters")])
def test_a_run_key_that_mlflow_or_the_file_system_cannot_take_is_refused(
        tmp_path: Path, key: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        run_paths(load_config("e2e", {"output_dir": str(tmp_path)}), key)
    assert not any(tmp_path.iterdir())


def test_a_reused_run_key_with_other_settings_or_data_is_refused_never_mixed(tmp_path: Path) -> None:
    source = tmp_path / "rows.jsonl"
    source.write_text(SAMPLE.read_text(encoding="utf-8"), encoding="utf-8")
    cfg = load_config("e2e", {"output_dir": str(tmp_path / "runs"), "data.source": str(source)})
    paths = run_paths(cfg, "reused")
    pipeline.load(pipeline.freeze(cfg, paths, first=True), paths)
    snapshot = paths.snapshot.read_bytes()
    # the same settings and data again (a retry of the first step): the run goes on
    assert pipeline.freeze(cfg, paths, first=True) == cfg
    pipeline.load(cfg, paths)

    other = load_config("e2e", {"output_dir": str(tmp_path / "runs"), "data.source": str(source),
                              "train.learning_rate": 1e-9, "train.max_steps": 7})
    with pytest.raises(ConfigError, match=r"run key 'reused' already holds a run with other settings "
                                          r"\(train.max_steps 30 -> 7, train.learning_rate 0.005 -> 1e-09\)"):
        pipeline.freeze(other, paths, first=True)
    assert read_json(paths.config)["train"]["learning_rate"] == cfg.train.learning_rate
    # a later step of the run reads its frozen copy, whatever the profile says by then
    assert pipeline.freeze(other, paths).train.learning_rate == cfg.train.learning_rate

    rows = [json.loads(line) for line in SAMPLE.read_text(encoding="utf-8").splitlines()]
    rows[0]["LONG_ANSWER"] += " Edited."
    source.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows), encoding="utf-8")
    with pytest.raises(DataError, match="run key 'reused' already holds a run on other data"):
        pipeline.load(cfg, paths)
    assert paths.snapshot.read_bytes() == snapshot
