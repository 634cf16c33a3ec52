"""Which stack trains (Unsloth or transformers + peft), and the trainer's entry point.

Unsloth patches transformers, TRL and peft as it is imported, so in a process that trains with
it, it must be imported before them: `train_here` picks the backend first and imports the
recipe (ml/train.py) after it. This module itself imports nothing of that stack.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ml.config import PipelineConfig
from ml.errors import ConfigError
from ml.runs import RunPaths

if TYPE_CHECKING:
    from ml.train import TrainResult

log = logging.getLogger(__name__)


def pick_backend(requested: str) -> str:
    """`unsloth` or `hf`; "auto" is unsloth where CUDA and Unsloth are both there. Imports Unsloth when it trains."""
    if requested == "hf" or (requested == "auto" and not torch.cuda.is_available()):
        return "hf"
    if requested not in ("auto", "unsloth"):
        raise ConfigError(f"unknown training backend {requested!r}")
    late = [m for m in ("transformers", "trl", "peft") if m in sys.modules and "unsloth" not in sys.modules]
    try:
        import unsloth  # noqa: F401  (first: it patches what it finds loaded, and what loads after)
    except (ImportError, NotImplementedError) as exc:  # not installed, or no GPU for it
        if requested == "auto":
            return "hf"
        raise ConfigError(f"train.backend=unsloth needs a CUDA GPU and Unsloth "
                          f"(pip install -r requirements/gpu.txt): {exc}") from exc
    if late:
        log.warning("Unsloth was imported after %s: train through `python -m ml train` (train.isolate: true) "
                    "for all of its optimisations", ", ".join(late))
    return "unsloth"


def train_here(cfg: PipelineConfig, splits_dir: Path, out_dir: Path, callbacks: Sequence[Any] = (),
               score_in: RunPaths | None = None) -> TrainResult:
    """Run the training recipe in this process, its backend imported first. With `score_in`, the run
    folder whose test split is then scored while the model is still loaded (ml/scoring.py)."""
    pick_backend(cfg.train.backend)
    from ml.scoring import after_training  # after Unsloth, as everything that imports transformers
    from ml.train import finetune

    return finetune(cfg, splits_dir, out_dir, callbacks, after_training(cfg, score_in) if score_in else None)
