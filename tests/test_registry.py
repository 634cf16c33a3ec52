"""The champion's alias against a real MLflow server."""

from __future__ import annotations

import pytest


@pytest.mark.slow
def test_champion_is_none_on_an_empty_registry(tracking: str, tmp_path: object) -> None:
    from pathlib import Path

    from ml import champion, tracking
    from ml.config import load_config

    cfg = load_config("e2e", {"registry.model_name": "never-registered"})
    assert champion.fetch(tracking.connect(cfg.registry), cfg.registry, Path(str(tmp_path))) is None
