"""Data-quality gate: a Great Expectations suite that runs before any GPU time.

The canonical records (values as the source had them) become one DataFrame with
a few derived columns (text per field, normalised question, split, token
count), and every check is a GX expectation over it, tagged with its family:

    schema      the three fields present, not null, of the right types
    content     no blank question/answer, lengths within bounds, answers that merely repeat the question
    uniqueness  no duplicate (normalised) questions, no duplicate row keys
    language    share of Hangul (or Latin) letters per row; catches mojibake
    privacy     no resident registration numbers, phone numbers or e-mail addresses
    fit         share of rows longer than model.max_seq_length tokens (their answers would be cut)
    size        row count within bounds
    splits      no test question that also appears (same words) in train

Thresholds live in the profile's `validation` section. The report is GX's own
validation-result JSON plus a static HTML page.

Memory stays bounded however many rows come (one frame of every row took ~26 KB a row: 2.7 GB for
100,000). The checks run chunk by chunk, each chunk of `CHUNK_ROWS` rows its own GX batch, and the
chunks' results merge into what one pass over every row gives: counts summed, the first unexpected
values and row keys kept, success by the expectation's `mostly`. What needs every row at once stays
narrow: the row key, normalised question and split of every row (leakage, uniqueness), the row count
on a frame without columns, each uniqueness check in batches of rows grouped by value. The fit check
tokenises at most `FIT_SAMPLE_ROWS` rows (tokenising is the slowest part): beyond that, a seeded random
sample of them, and the report says so.
"""

from __future__ import annotations

import dataclasses
import html
import json
import logging
import random
import re
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import great_expectations as gx
import great_expectations.expectations as gxe
import numpy as np
import pandas as pd
from great_expectations.core.expectation_validation_result import (
    ExpectationSuiteValidationResult,
    ExpectationValidationResult,
)
from great_expectations.data_context.types.base import ProgressBarsConfig
from great_expectations.expectations.expectation import _format_map_output, _mostly_success
from great_expectations.expectations.expectation_configuration import parse_result_format
from great_expectations.validator.v1_validator import Validator
from great_expectations.validator.validation_statistics import calc_validation_statistics

from ml.config import PipelineConfig
from ml.data import DECISION, DECISIONS, assign_split, normalize_question, to_example
from ml.expectations import ExpectColumnValuesToHaveScriptShare
from ml.gate_messages import Terms, merge_blank_and_length, message
from ml.prompt import PromptFormat, token_lengths
from ml.tokenizer_files import tokenizer_files

log = logging.getLogger(__name__)

FAMILIES = ("schema", "content", "uniqueness", "language", "privacy", "fit", "size", "splits")
TEXT_COLUMNS = ("QUESTION", "CONTEXTS", "LONG_ANSWER")
# Each pattern starts with a literal character so `re` can scan for it quickly (100k rows).
PII_PATTERNS = {
    "resident registration number": r"-(?<=(?<!\d)\d{6}-)[1-8]\d{6}(?!\d)",
    "phone number": r"0(?<![\d.]0)(?:1[016789][-\s.]?\d{3,4}|2[-\s.]\d{3,4}|[3-6][1-5][-\s.]\d{3,4})[-\s.]?\d{4}(?!\d)",
    "international phone number": r"\+82[-\s]?(?:1[016789]|2|[3-6][1-5])[-\s.]?\d{3,4}[-\s.]?\d{4}(?!\d)",
    "e-mail address": r"@(?<=[A-Za-z0-9._%+-]@)[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}",
}
CHUNK_ROWS = 10_000  # rows per GX batch: the gate holds one chunk's frame, token counts and GX metrics at a time
FIT_SAMPLE_ROWS = 10_000  # rows the fit check tokenises at most; beyond, a seeded random sample of this many
RESULT_FORMAT = {"result_format": "SUMMARY", "unexpected_index_column_names": ["key"], "partial_unexpected_count": 20}


@dataclass(frozen=True)
class CheckResult:
    family: str
    expectation: str
    column: str | None
    success: bool
    message: str  # in the data's terms (ml/gate_messages.py): column, rule with its bounds, rows
    examples: list[str] = field(default_factory=list)  # offending row keys
    detail: str = ""  # GX's numbers, as its result has them (the HTML page's detail column)
    unexpected: int | None = None  # offending rows (None: a table or column-level check)
    listed: list[str] = field(default_factory=list)  # every offending row's key, when GX listed them all


@dataclass(frozen=True)
class ValidationReport:
    success: bool
    rows: int
    checks: list[CheckResult]
    truncated_share: float | None
    gx_result: dict[str, Any]
    fit_sample: int | None = None  # rows the fit check tokenised when it sampled them (None: every row)

    @property
    def failures(self) -> list[CheckResult]:
        failed = [c for c in self.checks if not c.success]
        return sorted(failed, key=lambda c: FAMILIES.index(c.family) if c.family in FAMILIES else len(FAMILIES))

    @property
    def failed_families(self) -> set[str]:
        return {c.family for c in self.failures}

    @property
    def sample_note(self) -> str:
        return "" if self.fit_sample is None else _sample_note(self.fit_sample)

    def summary(self) -> str:
        trunc = ("" if self.truncated_share is None
                 else f"; {self.truncated_share:.1%} of rows exceed max_seq_length{self.sample_note}")
        if self.success:
            return f"data-quality gate passed: {len(self.checks)} expectations on {self.rows} rows{trunc}"
        lines = [f"data-quality gate FAILED: {len(self.failures)} of {len(self.checks)} expectations on "
                 f"{self.rows} rows{trunc}"]
        said = merge_blank_and_length([(c.column, c.expectation, -1 if c.unexpected is None else c.unexpected,
                                        c.listed, f"[{c.family}] {c.message}") for c in self.failures])
        lines += [f"  - {line}" for line in said]
        return "\n".join(lines)

    def write(self, json_path: Path) -> tuple[Path, Path]:
        """GX's validation-result JSON at `json_path`, the HTML page beside it (.html)."""
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(self.gx_result, ensure_ascii=False, indent=1, default=str),
                             encoding="utf-8")
        html_path = json_path.with_suffix(".html")
        html_path.write_text(render_html(self), encoding="utf-8")
        return json_path, html_path


# ---------------------------------------------------------------- derived columns

def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _contexts_kind(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        return "str"
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return "list[str]"
    return type(value).__name__


def _contexts_text(value: Any) -> str | None:
    """All contexts of a row as one text, for rows whose CONTEXTS has a valid kind."""
    kind = _contexts_kind(value)
    return value if kind == "str" else "\n".join(value) if kind == "list[str]" else None


def _repeats(question: str | None, answer: str | None) -> bool | None:
    """An answer that is the question again (or contained in it) answers nothing. `question` is normalised."""
    if question is None or answer is None:
        return None
    q, a = question, normalize_question(answer)
    return bool(a) and (a in q or (q in a and len(a) < 1.2 * len(q)))


def _bag(norm: str | None) -> str | None:
    return " ".join(sorted(set(norm.split()))) if norm else None


def _put(df: Any, name: str, values: list[Any]) -> None:
    df[name] = pd.Series(values, index=df.index, dtype=object)


def build_frame(records: Sequence[dict[str, Any]], cfg: PipelineConfig, tokenizer: Any | None) -> Any:
    """The records and every derived column, in one frame (what one chunk of the gate sees)."""
    frame = _chunk_frame(records, _table(records, cfg), cfg)
    if tokenizer is not None:
        _put(frame, "n_tokens", _token_counter(cfg, tokenizer)(frame, None))
    return frame


def _table(records: Sequence[dict[str, Any]], cfg: PipelineConfig) -> Any:
    """The derived columns that depend on other rows, for every row: the row key and normalised question
    (uniqueness), the split, and whether a test question's words make up a train question (leakage).
    Narrow on purpose: the only text it holds is the normalised question."""
    d = cfg.data
    df = pd.DataFrame(list(records), columns=["key", "QUESTION"], dtype=object)
    norm = [normalize_question(q) if isinstance(q, str) else None for q in df.pop("QUESTION")]
    _put(df, "QUESTION__normalized", norm)
    splits = [assign_split(str(k), d.val_fraction, d.test_fraction) for k in df["key"]]
    _put(df, "split", splits)
    bags = [_bag(n) for n in norm]
    train_bags = {b for s, b in zip(splits, bags, strict=True) if s == "train" and b is not None}
    _put(df, "test_question_in_train", [None if b is None else (s == "test" and b in train_bags)
                                        for s, b in zip(splits, bags, strict=True)])
    return df


def _chunk_frame(records: Sequence[dict[str, Any]], table: Any, cfg: PipelineConfig) -> Any:
    """`records` with their derived columns; `table` is their rows of `_table` (computed over all rows)."""
    # object dtype: values keep their own Python types (the schema checks look at them row by row),
    # and None stays None in derived columns (GX map expectations skip nulls).
    decision = [DECISION] if cfg.data.decision_column else []
    df = pd.DataFrame(list(records), columns=["key", *TEXT_COLUMNS, *decision], dtype=object)
    q_text = [_text(v) for v in df["QUESTION"]]
    a_text = [_text(v) for v in df["LONG_ANSWER"]]
    _put(df, "QUESTION__text", q_text)
    _put(df, "LONG_ANSWER__text", a_text)
    _put(df, "CONTEXTS__text", [_contexts_text(v) for v in df["CONTEXTS"]])
    _put(df, "CONTEXTS__kind", [_contexts_kind(v) for v in df["CONTEXTS"]])
    norm = table["QUESTION__normalized"].tolist()
    _put(df, "QUESTION__normalized", norm)
    _put(df, "LONG_ANSWER__repeats_question", [_repeats(q, a) for q, a in zip(norm, a_text, strict=True)])
    for col in ("split", "test_question_in_train"):
        _put(df, col, table[col].tolist())
    return df


def _token_counter(cfg: PipelineConfig, tokenizer: Any) -> Callable[[Any, Sequence[bool] | None], list[int | None]]:
    """Counts prompt + answer tokens per row of a frame, of the rows a mask selects (the others: None).
    A row whose text cannot fit is not tokenised (a 50 MB answer would take gigabytes of token
    bookkeeping): with more UTF-8 bytes than `max_seq_length` tokens of the vocabulary's longest can
    hold, its count is that lower bound, already past the limit."""
    longest = max(len(t.encode("utf-8")) for t in _vocabulary(tokenizer))  # once: a vocabulary may hold 100k+
    fmt = PromptFormat.from_config(cfg)

    def count(df: Any, selected: Sequence[bool] | None) -> list[int | None]:
        cols = zip(df["key"], df["QUESTION__text"], df["CONTEXTS"], df["CONTEXTS__text"], df["LONG_ANSWER__text"],
                   selected or [True] * len(df), strict=True)
        rows = [{"key": k, "QUESTION": q, "CONTEXTS": c, "LONG_ANSWER": a} if s and None not in (q, ct, a) else None
                for k, q, c, ct, a, s in cols]
        sizes = [sum(len(t.encode("utf-8")) for t in (r["QUESTION"], *r["CONTEXTS"], r["LONG_ANSWER"])) if r else 0
                 for r in rows]
        bound = [size // longest + 1 if size > longest * cfg.model.max_seq_length else None for size in sizes]
        counted = [r for r, b in zip(rows, bound, strict=True) if r and b is None]
        lengths = iter(token_lengths(tokenizer, [to_example(r) for r in counted], fmt))
        return [None if not r else b if b is not None else next(lengths) for r, b in zip(rows, bound, strict=True)]

    return count


def _vocabulary(tokenizer: Any) -> list[str]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return list((backend.get_vocab() if backend is not None else tokenizer.get_vocab()).keys())


# ---------------------------------------------------------------- the suite

def build_suite(cfg: PipelineConfig, with_fit: bool) -> Any:
    v = cfg.validation
    exps: list[Any] = []

    def add(family: str, exp: Any) -> None:
        exp.meta = {"family": family}
        exps.append(exp)

    for col in TEXT_COLUMNS:
        add("schema", gxe.ExpectColumnToExist(column=col))
        add("schema", gxe.ExpectColumnValuesToNotBeNull(column=col))
    add("schema", gxe.ExpectColumnValuesToBeInTypeList(column="QUESTION", type_list=["str"]))
    add("schema", gxe.ExpectColumnValuesToBeInTypeList(column="LONG_ANSWER", type_list=["str"]))
    add("schema", gxe.ExpectColumnValuesToBeInSet(column="CONTEXTS__kind", value_set=["str", "list[str]"]))
    if cfg.data.decision_column:
        add("schema", gxe.ExpectColumnValuesToNotBeNull(column=DECISION))
        add("schema", gxe.ExpectColumnValuesToBeInSet(column=DECISION, value_set=list(DECISIONS)))

    bounds = {"QUESTION": v.question_chars, "CONTEXTS": v.context_chars, "LONG_ANSWER": v.answer_chars}
    for col in ("QUESTION", "LONG_ANSWER"):
        add("content", gxe.ExpectColumnValuesToMatchRegex(column=f"{col}__text", regex=r"\S"))
    for col, (lo, hi) in bounds.items():
        add("content", gxe.ExpectColumnValueLengthsToBeBetween(column=f"{col}__text", min_value=lo, max_value=hi))
    add("content", gxe.ExpectColumnValuesToBeInSet(column="LONG_ANSWER__repeats_question", value_set=[False]))

    add("uniqueness", gxe.ExpectColumnValuesToBeUnique(column="QUESTION__normalized"))
    add("uniqueness", gxe.ExpectColumnValuesToBeUnique(column="key"))

    if v.script:
        for col in TEXT_COLUMNS:
            add("language", ExpectColumnValuesToHaveScriptShare(
                column=f"{col}__text", script=v.script, min_share=v.min_script_share, mostly=v.script_mostly))
    if v.check_pii:
        for col in TEXT_COLUMNS:
            add("privacy", gxe.ExpectColumnValuesToNotMatchRegexList(
                column=f"{col}__text", regex_list=list(PII_PATTERNS.values())))
    if with_fit:
        add("fit", gxe.ExpectColumnValuesToBeBetween(
            column="n_tokens", max_value=cfg.model.max_seq_length, mostly=1.0 - v.max_truncated_share))
    add("size", gxe.ExpectTableRowCountToBeBetween(min_value=v.min_rows, max_value=v.max_rows))
    add("splits", gxe.ExpectColumnValuesToBeInSet(column="test_question_in_train", value_set=[False]))
    return gx.ExpectationSuite(name=f"{cfg.profile}-data-gate", expectations=exps)


def terms(cfg: PipelineConfig) -> Terms:
    """How this dataset names its columns and rows, for the failure lines (ml/gate_messages.py)."""
    d = cfg.data
    return Terms(columns=dict(d.columns), key=d.id_column or "row key", decision=d.decision_column or DECISION,
                 decisions=DECISIONS, pii=PII_PATTERNS)


def _check_result(res: Any, words: Terms) -> CheckResult:
    conf = res.expectation_config
    column = conf.kwargs.get("column")
    r = res.result or {}
    keys = [str(row["key"]) for row in (r.get("partial_unexpected_index_list") or [])]
    error = None
    if res.exception_info and res.exception_info.get("raised_exception"):
        error = str(res.exception_info.get("exception_message"))
        detail = f"could not be evaluated: {error}"
    elif "unexpected_count" in r:
        detail = (f"{r['unexpected_count']} unexpected of {r.get('element_count')} rows "
                  f"({r.get('unexpected_percent') or 0:.1f}% of non-null values)")
        if conf.kwargs.get("mostly") is not None:
            detail += f"; allowed {100 * (1 - conf.kwargs['mostly']):.1f}%"
    else:
        detail = f"observed {r.get('observed_value')}"
    unexpected = r.get("unexpected_count")
    said = "" if res.success else message(conf.type, conf.kwargs, r, words, error)
    return CheckResult(conf.meta.get("family", "?"), conf.type, column, bool(res.success), said or detail,
                       keys[:5], detail, unexpected, keys if unexpected is not None and len(keys) >= unexpected else [])


def gate_tokenizer(cfg: PipelineConfig) -> Any:
    """The base model's tokenizer for the fit check, from its files alone (ml/tokenizer_files.py),
    or None without the check."""
    return tokenizer_files(cfg.model) if cfg.validation.check_fit else None


def gate(records: Sequence[dict[str, Any]], cfg: PipelineConfig, tokenizer: Any | None = None, *,
         chunk_rows: int = CHUNK_ROWS, fit_sample_rows: int = FIT_SAMPLE_ROWS) -> ValidationReport:
    """Run the suite; `tokenizer` (the base model's) enables the fit check. Chunks of `chunk_rows` rows, at
    most `fit_sample_rows` rows tokenised (module docstring)."""
    with_fit = cfg.validation.check_fit and tokenizer is not None
    suite = build_suite(cfg, with_fit)
    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    batches = (context.data_sources.add_pandas("retrain").add_dataframe_asset("records")
               .add_batch_definition_whole_dataframe("all"))
    # GX lists results grouped by column, columns in order of first appearance
    # (Validator.process_expectations_for_validation); in that order, any subset keeps its order too.
    columns = list(dict.fromkeys(getattr(e, "column", None) for e in suite.expectations))
    exps = sorted(suite.expectations, key=lambda e: columns.index(getattr(e, "column", None)))
    results: list[Any] = [None] * len(exps)  # each expectation's result over the rows validated so far

    def validate(frame: Any, which: list[int]) -> Any:
        sub = gx.ExpectationSuite(name=suite.name, expectations=[exps[i] for i in which])
        # What `Batch.validate` runs, without loading the batch twice (each load fingerprints the frame).
        result = Validator(batch_definition=batches, batch_parameters={"dataframe": frame},
                           result_format=RESULT_FORMAT).validate_expectation_suite(sub)
        for i, res in zip(which, result.results, strict=True):
            conf, exp = res.expectation_config, exps[i]
            assert (conf.type, conf.kwargs.get("column")) == (exp.expectation_type, getattr(exp, "column", None))
            results[i] = res if results[i] is None else _merged(results[i], res)
        return result.meta

    n = len(records)
    table = _table(records, cfg)
    every_row = (gxe.ExpectColumnValuesToBeUnique, gxe.ExpectTableRowCountToBeBetween)  # need all rows at once
    per_chunk = [i for i, e in enumerate(exps) if not isinstance(e, every_row)]
    count_tokens = _token_counter(cfg, tokenizer) if with_fit else None
    sample = set(random.Random(0).sample(range(n), fit_sample_rows)) if with_fit and n > fit_sample_rows else None
    counted = over = 0
    meta: dict[str, Any] = {}
    chunks = range(0, max(n, 1), chunk_rows)  # no rows: one empty chunk, so that every check has a result
    for start in chunks:
        stop = min(start + chunk_rows, n)
        frame = _chunk_frame(records[start:stop], table.iloc[start:stop], cfg)
        if count_tokens:
            tokens = count_tokens(frame, None if sample is None else [i in sample for i in range(start, stop)])
            _put(frame, "n_tokens", tokens)
            known = [t for t in tokens if t is not None]
            counted, over = counted + len(known), over + sum(t > cfg.model.max_seq_length for t in known)
        chunk_meta = validate(frame, per_chunk)
        meta = meta or chunk_meta  # the report's batch details: the first chunk's
        del frame  # before the next chunk's is built: one chunk in memory at a time
    for i, exp in enumerate(exps):
        if isinstance(exp, gxe.ExpectTableRowCountToBeBetween):
            validate(pd.DataFrame(index=table.index), [i])  # no columns: nothing to fingerprint but the rows
        elif isinstance(exp, gxe.ExpectColumnValuesToBeUnique):
            narrow = table[list(dict.fromkeys(["key", exp.column]))]
            for part in _by_value(narrow, exp.column, 10 * chunk_rows):  # narrow rows: ten chunks' worth a batch
                validate(part, [i])
    stats = calc_validation_statistics(results)
    result = ExpectationSuiteValidationResult(
        success=stats.success, results=results, suite_name=suite.name, meta={**meta, "chunks": len(chunks)},
        statistics={k: v for k, v in stats._asdict().items() if k != "success"})
    note = "" if sample is None else _sample_note(len(sample))
    words = terms(cfg)
    checks = [_check_result(r, words) for r in results]
    checks = [dataclasses.replace(c, message=c.message + note) if c.family == "fit" else c for c in checks]
    truncated = (over / counted if counted else 0.0) if with_fit else None
    report = ValidationReport(bool(result.success), n, checks, truncated, masked(result.to_json_dict()),
                              None if sample is None else len(sample))
    return report  # said once, by the caller: logged when it passed, raised or printed when it failed


def _by_value(frame: Any, column: str, rows: int) -> Iterator[Any]:
    """`frame` in parts of about `rows` rows, each value of `column` in one part (a hash of it picks which),
    each part's rows in their order: a uniqueness check over the parts finds every duplicate. (Counts and
    verdicts are one pass's; with several parts, the examples come part by part.)"""
    parts = -(-len(frame) // rows)
    if parts <= 1:
        yield frame
        return
    part = np.fromiter((zlib.crc32(str(v).encode("utf-8", "surrogatepass")) % parts for v in frame[column]),
                       dtype=np.int64, count=len(frame))
    for p in range(parts):
        yield frame[part == p]


def _merged(so_far: Any, more: Any) -> Any:
    """An expectation's result over the rows so far and one more chunk's, as one pass over both gives it.
    A map expectation's counts add up and GX's partial lists (the first unexpected values and row keys,
    in row order) join; GX's own code then judges and formats them: `mostly` of the rows it judges, the
    lists cut to `partial_unexpected_count` (private names of GX: it is pinned, and tests/test_validate.py
    compares merged results with GX's one pass). An error, or a missing column, is the first one met."""
    for res in (so_far, more):
        if res.exception_info and res.exception_info.get("raised_exception"):
            return res
    if "unexpected_count" not in (so_far.result or {}):  # a column's existence: the same in every chunk
        return more if so_far.success else so_far
    a, b = so_far.result, more.result
    rows, unexpected = a["element_count"] + b["element_count"], a["unexpected_count"] + b["unexpected_count"]
    # Not-null checks judge every row (GX reports no missing count for them), the others the non-null rows.
    nonnull = rows - a["missing_count"] - b["missing_count"] if "missing_count" in a else None
    judged = rows if nonnull is None else nonnull
    conf = so_far.expectation_config
    success = judged == 0 or _mostly_success(judged, unexpected, conf.kwargs.get("mostly", 1.0))
    output = _format_map_output(
        parse_result_format(RESULT_FORMAT), success, rows, nonnull, unexpected,
        unexpected_list=a.get("partial_unexpected_list", []) + b.get("partial_unexpected_list", []),
        unexpected_index_list=a.get("partial_unexpected_index_list", []) + b.get("partial_unexpected_index_list", []),
        unexpected_index_column_names=RESULT_FORMAT["unexpected_index_column_names"])
    return ExpectationValidationResult(success=success, expectation_config=conf, result=output["result"],
                                       meta=so_far.meta, exception_info=so_far.exception_info)


def _sample_note(rows: int) -> str:
    return f" (a random sample of {rows:,} rows tokenised)"


REPORT_CHARS = 500  # a value quoted in a report longer than this is cut, its length stated


def masked(obj: Any) -> Any:
    """`obj` with every personal identifier the privacy checks look for replaced by its kind
    ("[phone number]"), and every long text cut to `REPORT_CHARS`: GX's result quotes offending
    values, and the reports travel to MLflow. Row keys (`key` fields) stay, so reviewers still
    find the rows."""
    if isinstance(obj, str):
        extra = len(obj) - REPORT_CHARS
        text = obj[:REPORT_CHARS + 200] if extra > 0 else obj  # room for an identifier across the cut
        for kind, whole in _WHOLE.items():
            text = re.sub(whole, f"[{kind}]", text)
        return f"{text[:REPORT_CHARS]}… [{len(obj):,} characters in all]" if extra > 0 else text
    if isinstance(obj, dict):
        return {k: v if k == "key" else masked(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [masked(v) for v in obj]
    return obj


# The PII patterns match a distinctive part (a look-behind anchors them); to mask, the whole
# identifier: resident numbers with their birth date, e-mail addresses with their local part.
_WHOLE = {
    "resident registration number": r"(?<!\d)\d{6}-[1-8]\d{6}(?!\d)",
    "phone number": PII_PATTERNS["phone number"],
    "international phone number": PII_PATTERNS["international phone number"],
    "e-mail address": r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}",
}


# ---------------------------------------------------------------- HTML

def render_html(report: ValidationReport) -> str:
    status = "PASSED" if report.success else "FAILED"
    rows = []
    for c in report.failures + [c for c in report.checks if c.success]:
        rows.append(
            f"<tr class={'ok' if c.success else 'bad'}><td>{'✔' if c.success else '✘'}</td>"
            f"<td>{html.escape(c.family)}</td><td><code>{html.escape(c.expectation)}</code></td>"
            f"<td>{html.escape(c.column or '')}</td><td>{html.escape(c.message)}</td><td>{html.escape(c.detail)}</td>"
            f"<td>{html.escape(', '.join(c.examples))}</td></tr>")
    trunc = ("" if report.truncated_share is None else
             f"<p>Rows longer than the model's max_seq_length (answer cut off): "
             f"<b>{report.truncated_share:.1%}</b>{html.escape(report.sample_note)}</p>")
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>Data-quality gate: {status}</title>
<style>body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;vertical-align:top}} tr.bad{{background:#fde2e2}}
tr.ok{{background:#e6f4ea}} h1.bad{{color:#b00020}} h1.ok{{color:#1e7b34}}</style></head><body>
<h1 class={'ok' if report.success else 'bad'}>Data-quality gate {status}</h1>
<p>{report.rows} rows, {len(report.checks)} expectations, {len(report.failures)} failed
(families: {html.escape(', '.join(sorted(report.failed_families)) or 'none')}).</p>{trunc}
<table><tr><th></th><th>family</th><th>expectation</th><th>column</th><th>result</th><th>GX result</th>
<th>example row keys</th></tr>
{''.join(rows)}</table></body></html>
"""
