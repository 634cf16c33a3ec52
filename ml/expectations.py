"""Custom Great Expectations expectation used by the data-quality gate.

`ExpectColumnValuesToHaveScriptShare`: per row, the share of a text's letters
written in one script (Hangul or basic Latin) is at least `min_share`. Mojibake
(UTF-8 Korean decoded as Latin-1) turns Hangul into accented Latin letters, so
it fails this check as well.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

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


class ColumnValuesScriptShareAtLeast(ColumnMapMetricProvider):  # type: ignore[misc]
    condition_metric_name = "column_values.script_share_at_least"
    condition_value_keys = ("script", "min_share")

    @column_condition_partial(engine=PandasExecutionEngine)  # type: ignore[untyped-decorator]
    def _pandas(cls, column: Any, script: str, min_share: float, **kwargs: Any) -> Any:
        # Deleting runs of other characters and measuring what is left beats counting matches.
        letters = column.str.replace(NOT_LETTER, "", regex=True).str.len()
        in_script = column.str.replace(_not_in(script), "", regex=True).str.len()
        # Rows without letters (numbers only, empty) say nothing about the language.
        return (letters == 0) | (in_script >= min_share * letters)


class ExpectColumnValuesToHaveScriptShare(ColumnMapExpectation):  # type: ignore[misc]
    """Expect each text's letters to be mostly in one script (per row, with `mostly` over rows)."""

    script: Literal["hangul", "latin"]
    min_share: float = 0.5

    map_metric = "column_values.script_share_at_least"
    success_keys = ("script", "min_share", "mostly")
    library_metadata: ClassVar[dict[str, Any]] = {"maturity": "experimental", "tags": ["language", "text"],
                                                  "contributors": ["lora-retrain"]}
