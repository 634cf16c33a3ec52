"""Custom Great Expectations expectation used by the data-quality gate.

`ExpectColumnValuesToHaveScriptShare`: per row, the share of a text's letters
written in one script (Hangul or basic Latin) is at least `min_share`. Mojibake
(UTF-8 Korean decoded as Latin-1) turns Hangul into accented Latin letters, so
it fails this check as well.
"""

from __future__ import annotations

import functools
import re
import sys
from typing import Any, ClassVar, Literal

import numpy as np
from great_expectations.execution_engine import PandasExecutionEngine
from great_expectations.expectations.expectation import ColumnMapExpectation
from great_expectations.expectations.metrics.map_metric_provider import (
    ColumnMapMetricProvider,
    column_condition_partial,
)

SCRIPTS = {
    "hangul": "\uac00-\ud7a3\u1100-\u11ff\u3130-\u318f",
    "latin": "A-Za-z",
}
NOT_LETTER = r"[\W\d_]+"


def _not_in(script: str) -> str:
    return f"[^{SCRIPTS[script]}]+"


@functools.cache
def _tables(script: str) -> tuple[Any, Any]:
    """Per code point: is it a letter (kept by deleting `NOT_LETTER`), is it in `script` (kept by deleting
    `_not_in(script)`)? Built once from those regexes, over every code point, so counting a text's letters
    is a lookup per character: 4x faster than deleting runs with re.sub, the same counts."""
    every = "".join(map(chr, range(sys.maxunicode + 1)))
    tables = []
    for pattern in (NOT_LETTER, _not_in(script)):
        kept = np.ones(len(every), dtype=bool)
        for run in re.finditer(pattern, every):
            kept[run.start():run.end()] = False
        tables.append(kept)
    return tables[0], tables[1]


def letter_counts(text: str, script: str) -> tuple[int, int]:
    """(letters, letters in `script`) of `text`: what deleting runs of `NOT_LETTER`, or of `_not_in(script)`,
    leaves (tests/test_validate.py compares them)."""
    letter, in_script = _tables(script)
    codes = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4")
    return int(np.count_nonzero(letter[codes])), int(np.count_nonzero(in_script[codes]))


class ColumnValuesScriptShareAtLeast(ColumnMapMetricProvider):  # type: ignore[misc]
    condition_metric_name = "column_values.script_share_at_least"
    condition_value_keys = ("script", "min_share")

    @column_condition_partial(engine=PandasExecutionEngine)  # type: ignore[untyped-decorator]
    def _pandas(cls, column: Any, script: str, min_share: float, **kwargs: Any) -> Any:
        def passes(text: str) -> bool:
            letters, in_script = letter_counts(text, script)
            # Rows without letters (numbers only, empty) say nothing about the language.
            return letters == 0 or in_script >= min_share * letters

        return column.map(passes).astype(bool)


class ExpectColumnValuesToHaveScriptShare(ColumnMapExpectation):  # type: ignore[misc]
    """Expect each text's letters to be mostly in one script (per row, with `mostly` over rows)."""

    script: Literal["hangul", "latin"]
    min_share: float = 0.5

    map_metric = "column_values.script_share_at_least"
    success_keys = ("script", "min_share", "mostly")
    library_metadata: ClassVar[dict[str, Any]] = {"maturity": "experimental", "tags": ["language", "text"],
                                                  "contributors": ["lora-retrain"]}
