"""The data-quality gate's findings in the data's terms: one line per failed check, naming the
column as the dataset calls it, the rule with its bounds (or what its pattern means), and the rows
by their key. "LONG_ANSWER: 1 of 80 rows is empty or blank; answers must be 10-5000 characters of
text (validation.answer_chars) (PMID 90000004)" instead of "expect_column_values_to_match_regex on
LONG_ANSWER__text: 1 unexpected of 80 rows".

Pure: it reads an expectation's type, its kwargs and GX's result (the SUMMARY format, with the row
key as `unexpected_index_column_names`), nothing else. GX's own result (the JSON report, the HTML
page's detail column) keeps every number; these lines are what a person reads in a task log, a CLI
run or a notification. A personal identifier is named by its kind, never quoted.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

SHOWN_ROWS = 5  # row keys named on a line; more are counted ("and 3 more")
NOUNS = {"QUESTION": "questions", "CONTEXTS": "contexts", "LONG_ANSWER": "answers"}
LENGTH_KEYS = {"QUESTION": "question_chars", "CONTEXTS": "context_chars", "LONG_ANSWER": "answer_chars"}
SCRIPT_NAMES = {"hangul": "Hangul", "latin": "Latin"}


@dataclass(frozen=True)
class Terms:
    """How the dataset names things: its own name of each canonical column (data.columns), what its
    row keys are called (data.id_column), the decision column, and the privacy patterns by kind."""
    columns: Mapping[str, str] = field(default_factory=dict)
    key: str = "row key"
    decision: str = "final_decision"
    decisions: Sequence[str] = ("yes", "no", "maybe")
    pii: Mapping[str, str] = field(default_factory=dict)
    max_seq_length: int | None = None

    def column(self, canonical: str) -> str:
        return self.columns.get(canonical, canonical)


def _rows(n: int) -> str:
    return f"{n:,} row" + ("" if n == 1 else "s")


def _n(x: Any) -> str:
    """A bound as the profile states it (GX hands some back as floats: 512.0)."""
    return f"{int(x):,}" if isinstance(x, (int, float)) and float(x).is_integer() else f"{x:,}"


def _is(n: int, one: str, many: str) -> str:
    return one if n == 1 else many


def _keys(keys: Sequence[str], count: int, terms: Terms) -> str:
    """" (PMID 1, 2, 3 and 4 more)": the first row keys of `count` rows, the rest counted."""
    if not keys:
        return ""
    unique = list(dict.fromkeys(keys))  # a duplicated key is listed once per row
    shown = unique[:SHOWN_ROWS]
    more = count - len(keys) + len(unique) - len(shown)
    return f" ({terms.key} {', '.join(shown)}" + (f" and {more:,} more" if more > 0 else "") + ")"


def listed(result: Mapping[str, Any], column: str | None) -> list[tuple[str, Any]]:
    """(row key, value) of the rows GX lists as unexpected (its first `partial_unexpected_count`)."""
    return [(str(row.get("key")), row.get(column)) for row in result.get("partial_unexpected_index_list") or []]


def _found(values: Sequence[Any], limit: int = 40, quote: bool = True) -> str:
    """The distinct offending values, short, for a set or type rule (never free text: see callers)."""
    seen = list(dict.fromkeys(str(v)[:limit] for v in values))
    return "" if not seen else " (found " + ", ".join(repr(v) if quote else v for v in seen[:5]) + ")"


def canonical(column: str | None) -> str | None:
    """The dataset's column a derived column is computed from ("LONG_ANSWER__text" -> "LONG_ANSWER")."""
    if column is None:
        return None
    return {"test_question_in_train": "QUESTION", "n_tokens": None}.get(column, column.split("__")[0])


def message(kind: str, kwargs: Mapping[str, Any], result: Mapping[str, Any], terms: Terms,
            error: str | None = None) -> str:
    """One failed check (expectation `kind` with its `kwargs`, GX's `result`) as a line in the data's terms."""
    col = kwargs.get("column")
    canon = canonical(col)
    name = terms.key if col == "key" else "prompt + answer tokens" if col == "n_tokens" else \
        terms.column(canon) if canon else "dataset"
    noun = NOUNS.get(canon or "", "values")
    if error is not None:
        return f"{name}: the check {kind} could not run: {error}"
    if "unexpected_count" not in result:  # a table or column-level check
        if kind == "expect_table_row_count_to_be_between":
            lo, hi = kwargs.get("min_value"), kwargs.get("max_value")
            return (f"dataset: {_rows(int(result.get('observed_value') or 0))}; it needs {_n(lo)} to {_n(hi)} rows "
                    "(validation.min_rows, validation.max_rows)")
        if kind == "expect_column_to_exist":
            return f"{name}: the column is missing; every row needs it"
        return f"{name}: {kind} failed (observed {result.get('observed_value')})"

    n, total = int(result["unexpected_count"]), int(result.get("element_count") or 0)
    of = f"{n:,} of {_rows(total)}"
    rows = listed(result, col)
    complete = len(rows) >= n  # every offending row is listed: what they hold is known exactly
    keys = _keys([k for k, _ in rows], n, terms)
    mostly = kwargs.get("mostly")
    share = f" ({100 * n / total:.1f}%)" if total and mostly is not None else ""
    allowed = "" if mostly is None else f"; at most {100 * (1 - mostly):.3g}% of rows may"

    if kind == "expect_column_values_to_not_be_null":
        return f"{name}: {of} {_is(n, 'has', 'have')} no value; every row needs one{keys}"
    if kind == "expect_column_values_to_be_in_type_list":
        found = _found([type(v).__name__ for _, v in rows], quote=False)
        return f"{name}: {of} {_is(n, 'is', 'are')} not text{found}; {noun} must be strings{keys}"
    if kind == "expect_column_values_to_match_regex" and kwargs.get("regex") == r"\S":
        return f"{name}: {of} {_is(n, 'is', 'are')} empty or blank; {noun} must hold text{keys}"
    if kind == "expect_column_value_lengths_to_be_between":
        lo, hi = kwargs["min_value"], kwargs["max_value"]  # the gate sets both (validation.*_chars)
        sizes = [len(v) for _, v in rows if isinstance(v, str)]
        what = (f"shorter than {_n(lo)}" if complete and sizes and all(s < lo for s in sizes) else
                f"longer than {_n(hi)}" if complete and sizes and all(s > hi for s in sizes) else
                f"shorter than {_n(lo)} or longer than {_n(hi)}")
        return (f"{name}: {of} {_is(n, 'is', 'are')} {what} characters; {noun} must be {_n(lo)}-{_n(hi)} characters "
                f"(validation.{LENGTH_KEYS.get(canon or '', 'chars')}){keys}")
    if kind == "expect_column_values_to_be_in_set":
        if col == "CONTEXTS__kind":
            return (f"{name}: {of} {_is(n, 'is', 'are')} neither a text nor a list of texts"
                    f"{_found([v for _, v in rows])}{keys}")
        if col == "LONG_ANSWER__repeats_question":
            return (f"{name}: {of} only {_is(n, 'repeats its', 'repeat their')} question (the answer is the "
                    f"question or a part of it){keys}")
        if col == "test_question_in_train":
            return (f"{name}: {of} {_is(n, 'is a test question', 'are test questions')} whose words also make up a "
                    f"train question: the test would score what training saw{keys}")
        if col == terms.decision or canon == terms.decision:
            return (f"{name}: {of} {_is(n, 'is', 'are')} not {', '.join(terms.decisions[:-1])} or "
                    f"{terms.decisions[-1]}{_found([v for _, v in rows])}{keys}")
    if kind == "expect_column_values_to_be_unique":
        if col == "key":
            return f"{name}: {of} share their {terms.key} with another row; each row needs its own{keys}"
        return (f"{name}: {of} ask a question another row asks too (the same after folding case, width and "
                f"punctuation); each question once{keys}")
    if kind == "expect_column_values_to_have_script_share":
        script = SCRIPT_NAMES.get(kwargs.get("script", ""), str(kwargs.get("script")))
        return (f"{name}: {of}{share} {_is(n, 'has', 'have')} under {kwargs.get('min_share', 0.5):.0%} of "
                f"{_is(n, 'its', 'their')} letters in {script}: mojibake (UTF-8 read as Latin-1) or another "
                f"language{allowed}{keys}")
    if kind == "expect_column_values_to_not_match_regex_list":
        return _privacy(name, of, n, rows, terms)
    if kind == "expect_column_values_to_be_between" and col == "n_tokens":
        limit = kwargs.get("max_value")
        return (f"prompt + answer: {of}{share} {_is(n, 'is', 'are')} longer than model.max_seq_length, {_n(limit)} "
                f"tokens: {_is(n, 'its answer', 'their answers')} would be cut in training{allowed}"
                f" (validation.max_truncated_share){keys}")
    return f"{name}: {of}{share} break {kind}{allowed}{keys}"


def _privacy(name: str, of: str, n: int, rows: Sequence[tuple[str, Any]], terms: Terms) -> str:
    """Which kind of personal identifier each listed row holds (by the patterns' names), the text never quoted."""
    by_kind: dict[str, list[str]] = {}
    for key, text in rows:
        for kind, pattern in terms.pii.items():
            if isinstance(text, str) and re.search(pattern, text):
                by_kind.setdefault(kind, []).append(key)
    found = ", ".join(f"{kind}{_keys(keys, len(keys), terms)}" for kind, keys in by_kind.items())
    more = n - len(rows)
    rest = f" and {more:,} more {_is(more, 'row', 'rows')}" if more > 0 and found else ""
    kinds = list(terms.pii) or ["personal identifier"]
    rule = f"no text may hold a {', '.join(kinds[:-1])} or {kinds[-1]}" if len(kinds) > 1 else f"no {kinds[0]}"
    found = found or "of an unlisted kind"
    return f"{name}: {of} {_is(n, 'holds', 'hold')} a personal identifier: {found}{rest}; {rule}"


def merge_blank_and_length(lines: list[tuple[str | None, str, int, list[str], str]]) -> list[str]:
    """The failure lines, a column's blank check and its length check said once when they failed on the
    same rows (a blank text is also too short: two lines would report one row twice). Each entry:
    (column, expectation, unexpected count or -1, every offending key when all are listed else [], line)."""
    out: list[str] = []
    skip: set[int] = set()
    for i, (col, kind, n, keys, line) in enumerate(lines):
        if i in skip:
            continue
        if kind == "expect_column_values_to_match_regex" and keys:
            twin = next((j for j, (c, k, m, ks, _) in enumerate(lines) if c == col and m == n and ks == keys
                         and k == "expect_column_value_lengths_to_be_between"), None)
            if twin is not None:
                skip.add(twin)
                rule = lines[twin][4].split("; ", 1)[1]  # "answers must be 10-5,000 characters (...) (PMID ...)"
                line = line.split("; ", 1)[0] + "; " + rule.replace(" characters (", " characters of text (", 1)
        out.append(line)
    return out
