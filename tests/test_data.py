from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from conftest import PQAL, SAMPLE, imports_of

from ml.config import DataConfig
from ml.data import QAExample, assign_split, fingerprint, read_snapshot, split_examples, to_example
from ml.errors import DataError
from ml.sources import load_examples, load_records, snapshot

ROWS = [
    {"PMID": "1", "QUESTION": "질문 하나?", "CONTEXTS": ["맥락 가", "맥락 나"], "LONG_ANSWER": "답 하나."},
    {"PMID": "2", "QUESTION": "질문 둘?", "CONTEXTS": ["맥락 다"], "LONG_ANSWER": "답 둘."},
]


def _cfg(path: Path, **kw: object) -> DataConfig:
    # rows without a decision: the default profile's decision column is PubMedQA's
    return DataConfig(source=str(path), id_column="PMID", decision_column=None, **kw)  # type: ignore[arg-type]


def _expect_rows(examples: list[QAExample]) -> None:
    assert [e.key for e in examples] == ["1", "2"]
    assert examples[0].contexts == ("맥락 가", "맥락 나")
    assert examples[1].answer == "답 둘."


def test_jsonl(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in ROWS) + "\n", encoding="utf-8")
    _expect_rows(load_examples(_cfg(path)))


def test_json_list(tmp_path: Path) -> None:
    path = tmp_path / "d.json"
    path.write_text(json.dumps(ROWS, ensure_ascii=False), encoding="utf-8")
    _expect_rows(load_examples(_cfg(path)))


def test_pqal_dict_keyed_by_pmid(tmp_path: Path) -> None:
    path = tmp_path / "pqal.json"
    path.write_text(json.dumps({r["PMID"]: {k: v for k, v in r.items() if k != "PMID"} for r in ROWS}))
    _expect_rows(load_examples(DataConfig(source=str(path), decision_column=None)))


def test_parquet(tmp_path: Path) -> None:
    path = tmp_path / "d.parquet"
    pd.DataFrame(ROWS).to_parquet(path)
    _expect_rows(load_examples(_cfg(path)))


def test_csv_with_json_encoded_contexts(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    df = pd.DataFrame(ROWS)
    df["CONTEXTS"] = df["CONTEXTS"].map(lambda c: json.dumps(c, ensure_ascii=False))
    df.to_csv(path, index=False)
    _expect_rows(load_examples(_cfg(path)))


def test_save_to_disk_folder(tmp_path: Path) -> None:
    from datasets import Dataset, DatasetDict

    DatasetDict({"train": Dataset.from_list(ROWS)}).save_to_disk(str(tmp_path / "ds"))
    _expect_rows(load_examples(_cfg(tmp_path / "ds", split="train")))


def test_column_mapping_and_string_contexts(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    rows = [{"id": "a", "q": "질문?", "ctx": "한 문단 맥락", "a": "답."}]
    path.write_text(json.dumps(rows[0], ensure_ascii=False) + "\n", encoding="utf-8")
    cfg = DataConfig(source=str(path), id_column="id", decision_column=None,
                     columns={"QUESTION": "q", "CONTEXTS": "ctx", "LONG_ANSWER": "a"})
    (ex,) = load_examples(cfg)
    assert (ex.key, ex.question, ex.contexts, ex.answer) == ("a", "질문?", ("한 문단 맥락",), "답.")


def test_missing_column_is_named(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"QUESTION": "q", "CONTEXTS": []}) + "\n")
    with pytest.raises(DataError, match="LONG_ANSWER"):
        load_examples(DataConfig(source=str(path)))


def test_unreadable_and_missing_files(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n")
    with pytest.raises(DataError, match="bad.jsonl, line 1: not JSON"):
        load_examples(DataConfig(source=str(bad)))
    with pytest.raises(DataError, match="not found"):
        load_examples(DataConfig(source=str(tmp_path / "absent.jsonl")))


def test_hub_source_offline_fails_with_the_dataset_named() -> None:
    # HF_HUB_OFFLINE=1 (conftest): the real hub code runs and must say which dataset it could not get.
    with pytest.raises(DataError, match="ChuGyouk/PubMedQA-test-Ko"):
        load_examples(DataConfig(source="ChuGyouk/PubMedQA-test-Ko", split="train"))


def test_hub_source_goes_through_load_dataset(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    calls = []
    monkeypatch.setattr(datasets, "get_dataset_split_names", lambda name, revision: ["test"])  # no hub here

    def fake_load_dataset(name: str, split: str, revision: str | None) -> datasets.Dataset:
        calls.append((name, split, revision))
        return datasets.Dataset.from_list([{k: v for k, v in r.items() if k != "PMID"} for r in ROWS])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)  # the hub cannot be reached here
    examples = load_examples(DataConfig(source="org/name", split="test", revision="abc123", decision_column=None))
    assert calls == [("org/name", "test", "abc123")]
    assert [e.question for e in examples] == ["질문 하나?", "질문 둘?"]
    assert all(e.key.startswith("q-") for e in examples)  # no id column: keyed by the question


def test_shipped_sample_loads() -> None:
    examples = load_examples(DataConfig(source=str(SAMPLE), id_column="PMID"))
    assert len(examples) == 80
    assert len({e.key for e in examples}) == 80
    assert all(e.question and e.answer and e.contexts for e in examples)


def test_real_pubmedqa_pqal() -> None:
    examples = load_examples(DataConfig(source=str(PQAL)))
    assert len(examples) == 1000
    assert all(e.key.isdigit() for e in examples)
    parts = split_examples(examples, DataConfig(source=str(PQAL)))
    assert 60 < len(parts["test"]) < 140 and 60 < len(parts["validation"]) < 140


def test_snapshot_keeps_source_values_and_fingerprints_them(tmp_path: Path) -> None:
    cfg = DataConfig(source=str(SAMPLE), id_column="PMID")
    records = load_records(cfg)
    snap = snapshot(cfg, tmp_path)
    assert snap.rows == 80 and snap.fingerprint == fingerprint(records)
    assert read_snapshot(tmp_path) == records
    assert [to_example(r) for r in records] == load_examples(cfg)
    changed = [*records[:-1], {**records[-1], "LONG_ANSWER": "다른 답"}]
    assert fingerprint(changed) != snap.fingerprint


def test_records_keep_types_for_the_gate(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"PMID": 7, "QUESTION": 12, "CONTEXTS": None, "LONG_ANSWER": "답"}) + "\n")
    (rec,) = load_records(DataConfig(source=str(path), id_column="PMID", decision_column=None))
    assert rec == {"key": "7", "QUESTION": 12, "CONTEXTS": None, "LONG_ANSWER": "답"}


def test_split_is_deterministic_and_stable_under_appends() -> None:
    cfg = DataConfig(source="x", val_fraction=0.1, test_fraction=0.1)
    base = [QAExample(f"k{i}", f"q{i}", (), "a") for i in range(500)]
    before = {e.key: s for s, rows in split_examples(base, cfg).items() for e in rows}
    grown = [QAExample(f"new{i}", f"nq{i}", (), "a") for i in range(300)] + base[::-1]
    after = {e.key: s for s, rows in split_examples(grown, cfg).items() for e in rows}
    assert all(after[k] == s for k, s in before.items())
    counts = {s: list(before.values()).count(s) for s in ("train", "validation", "test")}
    assert 25 < counts["test"] < 80 and 25 < counts["validation"] < 80  # ~10% each
    assert assign_split("k1", 0.1, 0.1) == assign_split("k1", 0.1, 0.1)


def test_split_rejects_duplicate_keys() -> None:
    rows = [QAExample("same", "q1", (), "a"), QAExample("same", "q2", (), "a")]
    with pytest.raises(DataError, match="not unique"):
        split_examples(rows, DataConfig(source="x"))


def test_a_dataset_repository_folder_loads_through_the_hub_loader_and_names_its_splits(tmp_path: Path) -> None:
    """ChuGyouk/PubMedQA-test-Ko's layout: one JSON file, whose name makes its only split `test`."""
    repo = tmp_path / "PubMedQA-test-Ko"
    repo.mkdir()
    rows = [json.loads(line) for line in SAMPLE.read_text(encoding="utf-8").splitlines()]
    (repo / "pubmedQA_test_translated.json").write_text(
        json.dumps([{k: v for k, v in r.items() if k != "PMID"} for r in rows], ensure_ascii=False), encoding="utf-8")
    with pytest.raises(DataError, match="has no split 'train'; its splits: test"):
        load_records(DataConfig(source=str(repo), split="train"))
    examples = load_examples(DataConfig(source=str(repo)))  # the default split, test
    assert len(examples) == 80 and [e.question for e in examples] == [r["QUESTION"] for r in rows]
    assert [e.decision for e in examples] == [r["final_decision"] for r in rows]  # kept for evaluation
    assert load_examples(DataConfig(source=str(repo), decision_column=None))[0].decision is None



@pytest.mark.parametrize(("name", "text", "message"), [
    ("lines.jsonl", '{"QUESTION": "q"}\n\n["an", "array"]\n',
     r"lines.jsonl, line 3: expected a JSON object \(a record\), got list"),
    ("lines.jsonl", '{"QUESTION": "q"}\n"a string"\n', "line 2: expected a JSON object"),
    ("lines.jsonl", '{"QUESTION": "q"}\n{"QUESTION": \n', r"line 2: not JSON: Expecting value \(column 14\)"),
    ("lines.jsonl", '{"QUESTION": "\\ud800"}\n', "line 1: text that is not valid Unicode"),
    ("scalars.json", "[1, 2, 3]", "record 1: expected a JSON object"),
    ("deep.json", "[" * 100_000 + "]" * 100_000, "nested too deeply"),
])
def test_malformed_json_is_named_by_line_or_record(tmp_path: Path, name: str, text: str, message: str) -> None:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    with pytest.raises(DataError, match=message):
        load_records(DataConfig(source=str(path), decision_column=None))


def test_a_utf8_bom_is_accepted_in_json_as_in_csv(tmp_path: Path) -> None:
    rows = [{k: v for k, v in r.items()} for r in ROWS]
    for name, text in (("bom.json", json.dumps(rows, ensure_ascii=False)),
                       ("bom.jsonl", "\n".join(json.dumps(r, ensure_ascii=False) for r in rows))):
        path = tmp_path / name
        path.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
        _expect_rows(load_examples(_cfg(path)))


def test_the_pipelines_own_process_imports_no_dataset_loader() -> None:
    """`python -m ml pipeline` reads a file source and run folders without `datasets` (>1 s to import on
    the GPU machine) and scores nothing itself (the trainer does), so neither it nor torch is imported."""
    steps = "import ml.pipeline, ml.validate, ml.tracking, ml.registry"
    assert imports_of(steps, ("datasets", "torch", "transformers")) == []
    def read(source: Path, split: str) -> str:
        return ("from ml.config import DataConfig; from ml.sources import load_records; "
                f"load_records(DataConfig(source={str(source)!r}, split={split!r}))")

    assert imports_of(read(SAMPLE, "test"), ("datasets", "pandas")) == ["pandas"]
    assert imports_of(read(SAMPLE.parent, "train"), ("datasets",)) == ["datasets"]  # a folder: the hub's loader
