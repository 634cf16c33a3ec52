"""The Great Expectations gate: clean data passes; each corruption fails its own family only."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from conftest import PQAL

from ml.config import PipelineConfig, load_config
from ml.data import assign_split, to_example
from ml.sources import load_records
from ml.validate import FAMILIES, ValidationReport, gate


@pytest.fixture(scope="module")
def cfg() -> PipelineConfig:
    return load_config("e2e")  # the demo profile (Korean, min_rows 50) on the session's tiny model


@pytest.fixture(scope="module")
def tokenizer(tiny_model: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model))


@pytest.fixture(scope="module")
def clean(cfg: PipelineConfig) -> list[dict[str, Any]]:
    return load_records(cfg.data)


@pytest.fixture()
def rows(clean: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [dict(r) for r in clean]


def _gate(rows: list[dict[str, Any]], cfg: PipelineConfig, tokenizer: Any) -> ValidationReport:
    return gate(rows, cfg, tokenizer)


def _in_split(rows: list[dict[str, Any]], cfg: PipelineConfig, split: str) -> list[int]:
    return [i for i, r in enumerate(rows)
            if assign_split(r["key"], cfg.data.val_fraction, cfg.data.test_fraction) == split]


def test_clean_korean_sample_passes_every_family(clean: list[dict[str, Any]], cfg: PipelineConfig,
                                                 tokenizer: Any) -> None:
    report = _gate(clean, cfg, tokenizer)
    assert report.success and not report.failures, report.summary()
    assert {c.family for c in report.checks} == set(FAMILIES)
    assert report.truncated_share == 0.0


def test_schema_wrong_types(rows: list[dict[str, Any]], cfg: PipelineConfig, tokenizer: Any) -> None:
    rows[2]["QUESTION"] = 12345
    rows[4]["CONTEXTS"] = {"text": "맥락"}
    rows[6]["LONG_ANSWER"] = None
    report = _gate(rows, cfg, tokenizer)
    assert report.failed_families == {"schema"}, report.summary()
    keys = {k for c in report.failures for k in c.examples}
    assert {rows[2]["key"], rows[4]["key"], rows[6]["key"]} <= keys


def test_content_blank_answer(rows: list[dict[str, Any]], cfg: PipelineConfig, tokenizer: Any) -> None:
    rows[3]["LONG_ANSWER"] = "   "
    report = _gate(rows, cfg, tokenizer)
    assert report.failed_families == {"content"}, report.summary()
    assert all(c.examples == [rows[3]["key"]] for c in report.failures)


def test_content_answer_repeating_the_question(rows: list[dict[str, Any]], cfg: PipelineConfig,
                                               tokenizer: Any) -> None:
    rows[7]["LONG_ANSWER"] = rows[7]["QUESTION"]
    report = _gate(rows, cfg, tokenizer)
    assert report.failed_families == {"content"}, report.summary()
    (failure,) = report.failures
    assert failure.column == "LONG_ANSWER__repeats_question" and failure.examples == [rows[7]["key"]]


def test_content_length_bounds(rows: list[dict[str, Any]], cfg: PipelineConfig, tokenizer: Any) -> None:
    rows[1]["QUESTION"] = "암?"  # under validation.question_chars' minimum
    report = _gate(rows, cfg, tokenizer)
    assert report.failed_families == {"content"}, report.summary()


def test_uniqueness_duplicate_question_and_key(rows: list[dict[str, Any]], cfg: PipelineConfig,
                                               tokenizer: Any) -> None:
    a, b, c, d = _in_split(rows, cfg, "train")[:4]
    rows[b]["QUESTION"] = rows[a]["QUESTION"] + "  "  # the same after normalisation
    rows[d]["key"] = rows[c]["key"]
    report = _gate(rows, cfg, tokenizer)
    assert report.failed_families == {"uniqueness"}, report.summary()
    assert {c.column for c in report.failures} == {"QUESTION__normalized", "key"}


def test_language_mojibake(rows: list[dict[str, Any]], cfg: PipelineConfig, tokenizer: Any) -> None:
    for r in rows[:6]:  # 7.5% of rows: over the 5% that script_mostly tolerates
        r["QUESTION"] = r["QUESTION"].encode("utf-8").decode("latin-1")
    report = _gate(rows, cfg, tokenizer)
    assert report.failed_families == {"language"}, report.summary()
    (failure,) = report.failures
    assert failure.column == "QUESTION__text" and failure.examples[0] == rows[0]["key"]


def test_language_tolerates_a_few_rows(rows: list[dict[str, Any]], cfg: PipelineConfig, tokenizer: Any) -> None:
    rows[0]["QUESTION"] = "Is this an English question about vitamin D?"
    assert _gate(rows, cfg, tokenizer).success


def test_the_script_share_counts_letters_as_its_regexes_define_them() -> None:
    """The language check counts letters by a table lookup per character: the counts of deleting runs of
    non-letters (or of other scripts) with `re`, on random texts of Hangul, Jamo, Latin, ASCII, surrogates
    and any code point."""
    import random
    import re

    from ml.expectations import NOT_LETTER, SCRIPTS, _not_in, letter_counts

    rng = random.Random(0)
    pools = [range(0xAC00, 0xD7A4), range(0x1100, 0x1200), range(0x3130, 0x3190), range(0x20, 0x7F),
             range(0xC0, 0x250), range(0xD800, 0xE000), range(0x110000)]
    texts = ["", "2019-2021년 1,234명", *("".join(chr(rng.choice(rng.choice(pools))) for _ in range(rng.randrange(60)))
                                        for _ in range(2000))]
    for script in SCRIPTS:
        for text in texts:
            expected = len(re.sub(NOT_LETTER, "", text)), len(re.sub(_not_in(script), "", text))
            assert letter_counts(text, script) == expected, ascii(text)


def test_privacy_phone_email_and_resident_number(rows: list[dict[str, Any]], cfg: PipelineConfig,
                                                 tokenizer: Any) -> None:
    rows[5]["CONTEXTS"] = [*rows[5]["CONTEXTS"], "환자 연락처는 010-1234-5678 이었다."]
    rows[8]["LONG_ANSWER"] += " 문의: kim.doctor@hospital.kr"
    rows[9]["QUESTION"] = rows[9]["QUESTION"][:-1] + " (환자 900101-1234567)?"
    report = _gate(rows, cfg, tokenizer)
    assert report.failed_families == {"privacy"}, report.summary()
    flagged = {(c.column, k) for c in report.failures for k in c.examples}
    assert flagged == {("CONTEXTS__text", rows[5]["key"]), ("LONG_ANSWER__text", rows[8]["key"]),
                       ("QUESTION__text", rows[9]["key"])}


def test_fit_too_many_rows_longer_than_the_model_takes(rows: list[dict[str, Any]], cfg: PipelineConfig,
                                                       tokenizer: Any) -> None:
    for r in rows[:10]:  # 12.5% > max_truncated_share (10%)
        r["CONTEXTS"] = r["CONTEXTS"] * 8
    report = _gate(rows, cfg, tokenizer)
    assert report.failed_families == {"fit"}, report.summary()
    assert report.truncated_share == pytest.approx(10 / 80)
    assert "12.5%" in report.summary()


def test_size_below_min_rows(rows: list[dict[str, Any]], cfg: PipelineConfig, tokenizer: Any) -> None:
    report = _gate(rows[:40], cfg, tokenizer)
    assert report.failed_families == {"size"}, report.summary()


def test_splits_leak_a_reworded_train_question_into_test(rows: list[dict[str, Any]], cfg: PipelineConfig,
                                                         tokenizer: Any) -> None:
    source = rows[_in_split(rows, cfg, "train")[0]]
    words = source["QUESTION"].rstrip("?").split()
    key = next(f"leak-{i}" for i in range(1000)
               if assign_split(f"leak-{i}", cfg.data.val_fraction, cfg.data.test_fraction) == "test")
    rows.append({"key": key, "QUESTION": " ".join(reversed(words)) + "?", "CONTEXTS": source["CONTEXTS"],
                 "LONG_ANSWER": rows[0]["LONG_ANSWER"], "final_decision": source["final_decision"]})
    report = _gate(rows, cfg, tokenizer)
    assert report.failed_families == {"splits"}, report.summary()
    assert report.failures[0].examples == [key]


def test_reports_are_gx_json_and_html(rows: list[dict[str, Any]], cfg: PipelineConfig, tokenizer: Any,
                                      tmp_path: Path) -> None:
    rows[3]["LONG_ANSWER"] = ""
    json_path, html_path = _gate(rows, cfg, tokenizer).write(tmp_path / "validation.json")
    result = json.loads(json_path.read_text())
    assert result["success"] is False
    failed = [r for r in result["results"] if not r["success"]]
    assert failed and all(r["expectation_config"]["meta"]["family"] == "content" for r in failed)
    assert {r["expectation_config"]["type"] for r in result["results"]} >= {
        "expect_column_values_to_have_script_share", "expect_column_values_to_not_match_regex_list",
        "expect_table_row_count_to_be_between"}
    page = html_path.read_text()
    assert "Data-quality gate FAILED" in page and rows[3]["key"] in page


def test_real_english_pubmedqa_passes_with_the_english_profile(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from ml.prompt import PromptFormat
    from ml.tiny import build_tiny_model

    cfg = load_config("pubmedqa-en", {"data.source": str(PQAL)})
    records = load_records(cfg.data)
    # The profile's hub tokenizer is out of reach here: one trained on this data stands in.
    build_tiny_model([to_example(r) for r in records], tmp_path / "tok",
                     PromptFormat.from_config(cfg))
    report = gate(records, cfg, AutoTokenizer.from_pretrained(str(tmp_path / "tok")))
    assert report.success, report.summary()
    assert report.rows == 1000 and report.truncated_share is not None


@pytest.mark.parametrize(("text", "is_pii"), [
    ("연락처 010-1234-5678 이다", True), ("01012345678", True), ("02-123-4567", True), ("+82 10-1234-5678", True),
    ("kim.doctor@hospital.kr", True), ("환자 900101-1234567)", True),
    ("p<0.001, 2010-2015", False), ("95% CI 1.02-1.45", False), ("n=1234567", False), ("0.01-0.05", False),
    ("2019-2021년 1,234명", False), ("@twitter", False), ("OR 0.21 (0.11-0.42)", False),
])
def test_pii_patterns_flag_identifiers_not_statistics(text: str, is_pii: bool) -> None:
    import re

    from ml.validate import PII_PATTERNS

    assert any(re.search(p, text) for p in PII_PATTERNS.values()) == is_pii


def test_reports_mask_the_personal_data_they_found_and_keep_row_keys(
        rows: list[dict[str, Any]], cfg: PipelineConfig, tokenizer: Any, tmp_path: Path) -> None:
    found = ["010-1234-5678", "kim.doctor@hospital.kr", "900101-1234567"]
    rows[5]["CONTEXTS"] = [*rows[5]["CONTEXTS"], f"환자 연락처는 {found[0]} 이었다."]
    rows[8]["LONG_ANSWER"] += f" 문의: {found[1]}"
    rows[9]["QUESTION"] = rows[9]["QUESTION"][:-1] + f" (환자 {found[2]})?"
    report = _gate(rows, cfg, tokenizer)
    assert report.failed_families == {"privacy"}
    json_path, html_path = report.write(tmp_path / "validation.json")
    for text in (json_path.read_text(encoding="utf-8"), html_path.read_text(encoding="utf-8")):
        assert not [pii for pii in found + ["1234567", "kim.doctor"] if pii in text]
        assert all(rows[i]["key"] in text for i in (5, 8, 9))
    written = json_path.read_text(encoding="utf-8")
    assert "[phone number]" in written and "[e-mail address]" in written and "[resident registration number]" in written


def test_a_huge_row_is_judged_without_tokenising_it_and_its_report_stays_small(
        rows: list[dict[str, Any]], cfg: PipelineConfig, tokenizer: Any, tmp_path: Path) -> None:
    """A 5 MB answer: its token count is a lower bound from its size (already past max_seq_length),
    the other rows are counted exactly, and the report quotes it cut short, its identifiers masked.
    (A 50 MB row's memory and time: docs/benchmarks.md.)"""
    from ml.validate import REPORT_CHARS, build_frame

    exact = build_frame(rows, cfg, tokenizer)["n_tokens"].tolist()
    rows[5]["LONG_ANSWER"] = "연락처 010-1234-5678. " + "가나다라마바사아자차 " * 500_000
    frame = build_frame(rows, cfg, tokenizer)
    counts = frame["n_tokens"].tolist()
    assert counts[:5] + counts[6:] == exact[:5] + exact[6:]
    longest = max(len(t.encode()) for t in tokenizer.get_vocab())
    assert counts[5] == len(rows[5]["LONG_ANSWER"].encode() + rows[5]["QUESTION"].encode()
                            + "".join(rows[5]["CONTEXTS"]).encode()) // longest + 1 > cfg.model.max_seq_length
    report = _gate(rows, cfg, tokenizer)
    assert {"content", "privacy"} <= report.failed_families
    json_path, _ = report.write(tmp_path / "validation.json")
    written = json_path.read_text(encoding="utf-8")
    assert len(written) < 200_000 and "010-1234-5678" not in written and "[phone number]" in written
    assert f"{len(rows[5]['LONG_ANSWER']):,} characters in all" in written
    assert max(len(v) for v in _strings(json.loads(written))) < REPORT_CHARS + 100


def _strings(obj: Any) -> list[str]:
    if isinstance(obj, str):
        return [obj]
    values = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, list) else []
    return [s for v in values for s in _strings(v)]


def test_chunks_give_the_verdicts_counts_and_rows_of_one_pass(rows: list[dict[str, Any]], cfg: PipelineConfig,
                                                             tokenizer: Any) -> None:
    """The gate validates `chunk_rows` rows per GX batch, so that its memory stays bounded; merged, the
    chunks' results are those of GX's one pass over every row. Three chunks of 30 rows here: bad rows in
    the second and third, duplicates and a leak across chunks, shares that one chunk fails but all rows pass."""
    import great_expectations as gx

    from ml.validate import RESULT_FORMAT, build_frame, build_suite, masked

    train = _in_split(rows, cfg, "train")
    a, b = [i for i in train if 5 <= i < 30][:2]
    c = next(i for i in reversed(train) if i >= 60)
    rows[45]["LONG_ANSWER"] = "   "  # blank, in the second chunk
    rows[c]["QUESTION"] = rows[a]["QUESTION"]  # a duplicate question in the third chunk of one in the first
    rows[62]["key"] = rows[1]["key"]
    rows[75]["CONTEXTS"] = [*rows[75]["CONTEXTS"], "환자 연락처는 010-1234-5678 이었다."]
    for r in rows[30:33]:  # mojibake: 10% of the second chunk, 3.75% of all rows (script_mostly allows 5%)
        r["QUESTION"] = r["QUESTION"].encode("utf-8").decode("latin-1")
    for r in rows[:4]:  # past max_seq_length: 13% of the first chunk, 5% of all rows (max_truncated_share 10%)
        r["CONTEXTS"] = r["CONTEXTS"] * 8
    key = next(f"leak-{i}" for i in range(1000)
               if assign_split(f"leak-{i}", cfg.data.val_fraction, cfg.data.test_fraction) == "test")
    rows.append({**rows[b], "key": key, "QUESTION": " ".join(reversed(rows[b]["QUESTION"].rstrip("?").split())) + "?"})

    chunked = gate(rows, cfg, tokenizer, chunk_rows=30)
    one_pass = (gx.get_context(mode="ephemeral").data_sources.add_pandas("retrain").add_dataframe_asset("records")
                .add_batch_definition_whole_dataframe("all")
                .get_batch(batch_parameters={"dataframe": build_frame(rows, cfg, tokenizer)})
                .validate(build_suite(cfg, with_fit=True), result_format=RESULT_FORMAT))
    assert chunked.gx_result["meta"]["chunks"] == 3
    assert chunked.gx_result["results"] == masked(one_pass.to_json_dict())["results"]
    assert chunked.failed_families == {"content", "uniqueness", "privacy", "splits"}, chunked.summary()
    failed = {c.column: c.examples for c in chunked.failures}
    assert failed["LONG_ANSWER__text"] == [rows[45]["key"]] and failed["CONTEXTS__text"] == [rows[75]["key"]]
    assert failed["QUESTION__normalized"] == [rows[a]["key"], rows[c]["key"]]
    assert failed["key"] == [rows[1]["key"]] * 2 and failed["test_question_in_train"] == [key]
    whole = gate(rows, cfg, tokenizer)  # the default chunk holds every row
    assert (chunked.summary(), chunked.truncated_share) == (whole.summary(), whole.truncated_share)
    # 11 chunks, each uniqueness check in two batches of rows (equal values in one): examples come batch by batch
    small = gate(rows, cfg, tokenizer, chunk_rows=8)
    assert small.gx_result["meta"]["chunks"] == 11
    assert ([(c.expectation, c.column, c.success, c.message, sorted(c.examples)) for c in small.checks]
            == [(c.expectation, c.column, c.success, c.message, sorted(c.examples)) for c in chunked.checks])


def test_the_gates_memory_does_not_grow_with_rows_beyond_a_chunk(clean: list[dict[str, Any]], cfg: PipelineConfig,
                                                                 tokenizer: Any) -> None:
    """Peak memory (Python's allocations) of the gate on four chunks of rows is that of two: one frame of
    every row grew ~26 KB a row (issue 29). Seconds and resident memory on 100k and 1M rows: docs/benchmarks.md."""
    import tracemalloc

    def rows(n: int) -> list[dict[str, Any]]:  # long contexts: the rows outweigh GX's own allocations
        return [{**r, "key": f"{r['key']}-{i}", "QUESTION": f"{r['QUESTION'][:-1]} ({i})?",
                 "CONTEXTS": r["CONTEXTS"] * 40} for i, r in enumerate(clean[i % len(clean)] for i in range(n))]

    def peak(records: list[dict[str, Any]]) -> int:
        tracemalloc.start()
        try:
            gate(records, cfg, tokenizer, chunk_rows=25)
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    two, four = peak(rows(50)), peak(rows(100))
    assert four < 1.3 * two, f"{two / 2**20:.1f} MiB for 2 chunks, {four / 2**20:.1f} MiB for 4"


def test_the_fit_check_tokenises_a_random_sample_of_many_rows(rows: list[dict[str, Any]], cfg: PipelineConfig,
                                                              tokenizer: Any) -> None:
    for r in rows[:20]:  # 25% of the rows past max_seq_length
        r["CONTEXTS"] = r["CONTEXTS"] * 8
    report = gate(rows, cfg, tokenizer, fit_sample_rows=40)
    assert report.fit_sample == 40 and "(a random sample of 40 rows tokenised)" in report.summary()
    (fit,) = [c for c in report.checks if c.family == "fit"]
    assert not fit.success and fit.message.endswith("(a random sample of 40 rows tokenised)")
    assert report.truncated_share is not None and 0.1 < report.truncated_share < 0.45
    assert gate(rows, cfg, tokenizer).truncated_share == 0.25  # every row


def test_the_snapshot_keeps_a_wrong_type_wrong_for_the_gate(
        cfg: PipelineConfig, tokenizer: Any, tmp_path: Path) -> None:
    """A bytes column (parquet binary) fails the gate on the source; the pipeline's gate reads the
    snapshot, which must not turn the bytes into the text "b'...'" that passes."""
    import pandas as pd

    from ml.data import read_snapshot
    from ml.sources import snapshot

    frame = pd.DataFrame([{k: v for k, v in r.items()} for r in load_records(cfg.data)])
    frame["CONTEXTS"] = frame["CONTEXTS"].map(list)
    frame["QUESTION"] = frame["QUESTION"].map(str.encode)  # a binary column: every question is bytes
    source = tmp_path / "binary.parquet"
    frame.to_parquet(source)
    data = cfg.data.model_copy(update={"source": str(source), "id_column": "key"})
    direct = gate(load_records(data), cfg, tokenizer)
    snapshot(data, tmp_path / "snap")
    via_snapshot = gate(read_snapshot(tmp_path / "snap"), cfg, tokenizer)
    assert "schema" in direct.failed_families
    assert via_snapshot.failed_families == direct.failed_families, via_snapshot.summary()


def _same_counts(model_cfg: Any, examples: list[Any], fmt: Any) -> None:
    """The gate's tokenizer (its files alone) renders and counts exactly as transformers' AutoTokenizer."""
    from ml.modeling import load_tokenizer
    from ml.prompt import render, token_lengths
    from ml.tokenizer_files import tokenizer_files

    light, full = tokenizer_files(model_cfg), load_tokenizer(model_cfg)
    assert light.special_tokens_map["eos_token"] == full.eos_token and light.bos_token == full.bos_token
    for ex in examples[:5]:
        answer = ex.target(fmt.lead_with_decision)
        assert render(light, fmt, ex.question, ex.contexts, answer) == render(full, fmt, ex.question, ex.contexts,
                                                                              answer)
    counts = token_lengths(light, examples, fmt)
    assert counts == token_lengths(full, examples, fmt) and len(set(counts)) > 5


def test_the_fit_check_counts_tokens_as_the_trainer_does_without_the_model_stack(
        cfg: PipelineConfig, clean: list[dict[str, Any]], tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import dataclasses

    from conftest import imports_of
    from huggingface_hub.errors import LocalEntryNotFoundError

    from ml import tokenizer_files
    from ml.prompt import PromptFormat, token_lengths

    examples = [to_example(r) for r in clean]
    fmt = PromptFormat.from_config(cfg)
    _same_counts(cfg.model, examples, fmt)  # the chat template
    _same_counts(cfg.model, examples, dataclasses.replace(fmt, use_chat_template=False))  # BOS + Alpaca + EOS
    assert imports_of("import ml.validate", ("torch", "peft", "transformers", "datasets")) == []
    # a hub id: the same files, downloaded (stood in by the local folder; optional files may be absent)

    def download(repo: str, name: str, revision: str | None) -> str:
        assert repo == "org/tiny-llama-ko"
        if not (tiny_model / name).exists():  # what hf_hub_download raises offline for a file it lacks
            raise LocalEntryNotFoundError(f"{name} of {repo} is not in the local cache")
        return str(tiny_model / name)

    monkeypatch.setattr(tokenizer_files, "hf_hub_download", download)
    from_hub = tokenizer_files.tokenizer_files(cfg.model.model_copy(update={"base_model": "org/tiny-llama-ko"}))
    assert token_lengths(from_hub, examples, fmt) == token_lengths(tokenizer_files.tokenizer_files(cfg.model),
                                                                   examples, fmt)


def test_chat_templates_render_in_the_gate_as_in_transformers() -> None:
    """The features real templates use (Llama 3.1's: raise_exception, tojson, strftime_now; loop controls;
    generation blocks; trimmed blocks) give transformers' text, and a template's own error is raised."""
    import jinja2
    from transformers.utils.chat_template_utils import render_jinja_template

    from ml.tokenizer_files import compile_chat_template

    template = (
        "{{ bos_token }}{% for m in messages %}\n    {% if m['role'] not in ['user', 'assistant'] %}"
        "{{ raise_exception('unknown role ' + m['role']) }}{% endif %}\n"
        "  <|{{ m['role'] }}|>{{ m['content'] | tojson }}{% if loop.index > 2 %}{% break %}{% endif %}\n"
        "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] | trim }}{% endgeneration %}{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}<|assistant|>{{ strftime_now('%Y') }}{% endif %}")
    messages = [{"role": "user", "content": "질문 <b>\"quoted\"</b>"}, {"role": "assistant", "content": " 답 "},
                {"role": "user", "content": "again"}, {"role": "assistant", "content": "never shown"}]
    for prompt in (False, True):
        theirs, _ = render_jinja_template([messages], chat_template=template, add_generation_prompt=prompt,
                                          bos_token="<s>", eos_token="</s>")
        ours = compile_chat_template(template).render(messages=messages, tools=None, documents=None,
                                                      add_generation_prompt=prompt, bos_token="<s>", eos_token="</s>")
        assert ours == theirs[0] and "never shown" not in ours
    with pytest.raises(jinja2.exceptions.TemplateError, match="unknown role system"):
        compile_chat_template(template).render(messages=[{"role": "system", "content": "x"}])


# ---------------------------------------------------------------- the failure lines a person reads

def _bad_rows(rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """An empty answer, a question over its bound, and one row per kind of personal identifier."""
    rows[3]["LONG_ANSWER"] = ""
    rows[4]["QUESTION"] = "폐암 " * 600 + "?"  # 1,801 characters: over question_chars' 1,000
    pii = {"resident registration number": "환자 900101-1234567", "phone number": "연락처 010-1234-5678",
           "international phone number": "해외 +82 10-1234-5678", "e-mail address": "문의 kim.doctor@hospital.kr"}
    for i, text in enumerate(pii.values()):
        rows[10 + i]["CONTEXTS"] = [*rows[10 + i]["CONTEXTS"], text]
    return rows, {kind: rows[10 + i]["key"] for i, kind in enumerate(pii)}


def test_failure_lines_name_the_column_the_rule_its_bounds_and_the_rows(
        rows: list[dict[str, Any]], cfg: PipelineConfig, tokenizer: Any) -> None:
    rows, pii_rows = _bad_rows(rows)
    report = _gate(rows, cfg, tokenizer)
    lines = report.summary().splitlines()[1:]
    assert lines[0] == (f"  - [content] QUESTION: 1 of 80 rows is longer than 1,000 characters; questions must be "
                        f"10-1,000 characters (validation.question_chars) (PMID {rows[4]['key']})")
    # the empty answer breaks the not-blank and the length rule: said once, with the bounds
    assert lines[1] == (f"  - [content] LONG_ANSWER: 1 of 80 rows is empty or blank; answers must be 10-5,000 "
                        f"characters of text (validation.answer_chars) (PMID {rows[3]['key']})")
    (privacy,) = [line for line in lines if "[privacy]" in line]
    assert privacy.startswith("  - [privacy] CONTEXTS: 4 of 80 rows hold a personal identifier: ")
    for kind, key in pii_rows.items():  # each kind named with its row, none of the identifiers quoted
        assert f" {kind} (PMID {key})" in privacy
    assert not any(text in privacy for text in ("1234", "kim.doctor", "900101"))
    assert "expect_" not in report.summary() and "__text" not in report.summary()
    assert len(report.failures) == 4 and len(lines) == 3  # four rules broken, three lines


def test_failure_lines_say_the_script_share_fit_and_size_rules_in_numbers(
        rows: list[dict[str, Any]], cfg: PipelineConfig, tokenizer: Any) -> None:
    for r in rows[:6]:
        r["QUESTION"] = r["QUESTION"].encode("utf-8").decode("latin-1")
    for r in rows[6:16]:
        r["CONTEXTS"] = r["CONTEXTS"] * 8
    lines = _gate(rows[:60], cfg, tokenizer).summary().splitlines()[1:]
    keys = ", ".join(r["key"] for r in rows[:5])
    assert (f"  - [language] QUESTION: 6 of 60 rows (10.0%) have under 50% of their letters in Hangul: mojibake "
            f"(UTF-8 read as Latin-1) or another language; at most 5% of rows may (PMID {keys} and 1 more)") in lines
    (fit,) = [line for line in lines if "[fit]" in line]
    assert fit.startswith(f"  - [fit] prompt + answer: 10 of 60 rows (16.7%) are longer than model.max_seq_length, "
                          f"{cfg.model.max_seq_length:,} tokens: their answers would be cut in training; at most 10% "
                          "of rows may (validation.max_truncated_share) (PMID ")
    size = _gate(rows[16:56], cfg, tokenizer).summary().splitlines()[1:]
    assert size == ["  - [size] dataset: 40 rows; it needs 50 to 1,000,000 rows (validation.min_rows, "
                    "validation.max_rows)"]


def test_the_gx_report_keeps_its_detail(rows: list[dict[str, Any]], cfg: PipelineConfig, tokenizer: Any,
                                        tmp_path: Path) -> None:
    rows, _ = _bad_rows(rows)
    json_path, html_path = _gate(rows, cfg, tokenizer).write(tmp_path / "validation.json")
    failed = [r for r in json.loads(json_path.read_text())["results"] if not r["success"]]
    assert {(r["expectation_config"]["type"], r["expectation_config"]["kwargs"]["column"],
             r["result"]["unexpected_count"]) for r in failed} == {
        ("expect_column_values_to_match_regex", "LONG_ANSWER__text", 1),
        ("expect_column_value_lengths_to_be_between", "LONG_ANSWER__text", 1),
        ("expect_column_value_lengths_to_be_between", "QUESTION__text", 1),
        ("expect_column_values_to_not_match_regex_list", "CONTEXTS__text", 4)}
    page = html_path.read_text()
    assert "4 unexpected of 80 rows (5.0% of non-null values)" in page and "hold a personal identifier" in page


def test_each_failure_line_is_said_once(rows: list[dict[str, Any]], cfg: PipelineConfig, tmp_path: Path,
                                        tiny_model: Path, capsys: pytest.CaptureFixture[str],
                                        caplog: pytest.LogCaptureFixture) -> None:
    """Once by the CLI (printed, not logged too), once by the pipeline's step (raised, not logged too)."""
    from ml.__main__ import main
    from ml.errors import GateFailed
    from ml.pipeline import data_steps
    from ml.runs import run_paths

    rows, _ = _bad_rows(rows)
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(json.dumps({**{k: v for k, v in r.items() if k != "key"}, "PMID": r["key"]},
                                        ensure_ascii=False) for r in rows), encoding="utf-8")
    caplog.set_level("INFO")
    assert main(["validate", "--data", str(bad), "--profile", "e2e"]) == 1
    out = capsys.readouterr()
    said = out.out + out.err + caplog.text
    lines = [line for line in out.out.splitlines() if line.startswith("  - ")]
    assert len(lines) == 3 and all(said.count(line.strip()) == 1 for line in lines), said

    caplog.clear()
    run_cfg = load_config("e2e", {"data.source": str(bad), "output_dir": str(tmp_path / "runs")})
    paths = run_paths(run_cfg, "once")
    data_steps.load(run_cfg, paths)
    with pytest.raises(GateFailed) as failed:
        data_steps.validate(run_cfg, paths)
    assert all(str(failed.value).count(line.strip()) == 1 and line.strip() not in caplog.text for line in lines)
