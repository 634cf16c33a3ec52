"""Promotion rule and registry bookkeeping against a real MLflow server."""

from __future__ import annotations

import pytest


@pytest.mark.slow
def test_champion_is_none_on_an_empty_registry(tracking: str, tmp_path: object) -> None:
    from pathlib import Path

    from ml.config import load_config
    from ml.registry import champion

    cfg = load_config("e2e", {"registry.model_name": "never-registered"})
    assert champion(cfg.registry, Path(str(tmp_path))) is None
