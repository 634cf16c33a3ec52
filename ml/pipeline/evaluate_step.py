"""The evaluate step: challenger vs champion (or the bare base model) on the same test rows, and the
promotion rule's decision on them (ml/evaluation.py)."""

from __future__ import annotations

from typing import Any

from ml.config import PipelineConfig
from ml.data import read_split
from ml.evaluation import conclude, standing_scores
from ml.identity import row_hashes
from ml.runs import RunPaths, write_json


def evaluate(cfg: PipelineConfig, paths: RunPaths) -> dict[str, Any]:
    """Judge the scores the trainer wrote while its model was loaded, while they still stand for the
    adapter, the test rows and the champion; else load the model and score it again first, each
    model with its own prompt settings (ml/scoring.py)."""
    from ml import champion, tracking  # MLflow

    client = tracking.connect(cfg.registry)
    now = champion.version(client, cfg.registry)
    scores = standing_scores(paths, now) if cfg.eval.score_while_loaded else None
    if scores is None:
        from ml.scoring import score_again  # torch, transformers

        scores = score_again(cfg, paths, champion.fetch(client, cfg.registry, paths.champion), "evaluate step")
    write_json(paths.train_rows, row_hashes(read_split(paths.splits, "train")))
    record = conclude(cfg, paths, scores)
    decision = record["decision"]
    return {"challenger_loss": record["challenger"]["loss"], "baseline_loss": record["baseline"]["loss"],
            "baseline": record["baseline_name"], "promote": decision["outcome"] == "promote",
            "outcome": decision["outcome"]}
