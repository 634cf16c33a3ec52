"""Promotion rule and registry bookkeeping against a real MLflow server."""

from __future__ import annotations

import pytest

from ml.registry import decide


def test_promotes_only_on_strict_improvement_beyond_min_delta() -> None:
    assert decide(1.0, 1.2, "champion v1", 0.0).promote
    assert not decide(1.2, 1.2, "champion v1", 0.0).promote  # a tie keeps the champion
    assert not decide(1.3, 1.2, "champion v1", 0.0).promote
    assert not decide(1.15, 1.2, "champion v1", 0.1).promote
    assert decide(1.05, 1.2, "champion v1", 0.1).promote


def test_decision_reason_names_both_losses() -> None:
    d = decide(1.21, 1.24, "champion v3", 0.0)
    assert "1.2100" in d.reason and "1.2400" in d.reason and "champion v3" in d.reason


@pytest.mark.slow
def test_champion_is_none_on_an_empty_registry(tracking: str, tmp_path: object) -> None:
    from pathlib import Path

    from ml.config import load_config
    from ml.registry import champion

    cfg = load_config("e2e", {"registry.model_name": "never-registered"})
    assert champion(cfg.registry, Path(str(tmp_path))) is None
