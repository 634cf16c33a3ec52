"""The steps before training: freeze the run's config, load (the snapshot), preflight (the registry
answers; skip a run that would repeat the champion's training), validate (the data-quality gate)
and prepare (the split)."""

from __future__ import annotations

import logging
from typing import Any

from ml.config import PipelineConfig
from ml.data import Snapshot, read_snapshot, split_examples, to_example, write_splits
from ml.errors import GateFailed
from ml.identity import config_hash
from ml.runs import RunPaths, read_json, write_json

log = logging.getLogger(__name__)


def freeze(cfg: PipelineConfig, paths: RunPaths) -> PipelineConfig:
    """The run's effective config, written once when it starts; later steps read this copy, so a
    profile edited mid-run changes nothing in it."""
    if paths.config.exists():
        return PipelineConfig.model_validate(read_json(paths.config))
    write_json(paths.config, cfg.model_dump(mode="json"))
    return cfg


def load(cfg: PipelineConfig, paths: RunPaths) -> Snapshot:
    from ml.sources import snapshot  # pandas, and datasets for a hub source

    return snapshot(cfg.data, paths.data)


def preflight(cfg: PipelineConfig, paths: RunPaths, run_key: str | None = None, force: bool = False) -> str | None:
    """Before any GPU time: the registry must answer and take this run's writes (else
    RegistryUnavailable, naming the tracking URI); then, unless `force`, why this run would
    repeat the champion's training (same data fingerprint, same training settings), or None.
    With a run key, a skip is noted in MLflow as a finished run that says so."""
    from ml import champion, tracking  # MLflow

    client = tracking.check_writable(cfg.registry)
    if force:
        return None
    snap, config = read_json(paths.snapshot), config_hash(cfg)
    tags = champion.tags(client, cfg.registry)
    if not (tags and tags.get("data_fingerprint") == snap["fingerprint"] and tags.get("config_sha256") == config):
        return None
    reason = (f"nothing changed since champion v{tags['version']}: the same data (fingerprint "
              f"{snap['fingerprint'][:16]}) and the same training settings ({config}); "
              "trigger with force=true to train anyway")
    log.info("skipping: %s", reason)
    if run_key:
        tracking.log_skipped(client, cfg, run_key, reason, snap)
    return reason


def validate(cfg: PipelineConfig, paths: RunPaths, run_key: str | None = None) -> dict[str, Any]:
    """The data-quality gate (ml/validate.py) on the run's snapshot, its report in the run folder. On
    failure, with a run key, the reports are logged to MLflow as a run tagged failed (so reviewers see
    why a retrain did not happen) and `GateFailed` stops the pipeline: nothing is trained or registered."""
    from ml.validate import gate, gate_tokenizer  # Great Expectations

    report = gate(read_snapshot(paths.data), cfg, gate_tokenizer(cfg))
    report.write(paths.validation)
    if not report.success:
        if run_key:
            from ml import tracking

            tracking.log_failed_validation(tracking.connect(cfg.registry), cfg, run_key, paths,
                                           read_json(paths.snapshot))
        raise GateFailed(report.summary())
    return {"success": True, "expectations": len(report.checks), "rows": report.rows,
            "truncated_share": report.truncated_share}


def prepare(cfg: PipelineConfig, paths: RunPaths) -> dict[str, int]:
    examples = [to_example(r) for r in read_snapshot(paths.data)]
    counts = write_splits(split_examples(examples, cfg.data), paths.splits)
    write_json(paths.split_counts, counts)
    return counts
