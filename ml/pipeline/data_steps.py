"""The steps before training: freeze the run's config, load (the snapshot), preflight (the registry
answers; skip a run that would repeat the champion's training), validate (the data-quality gate)
and prepare (the split)."""

from __future__ import annotations

import logging
from typing import Any

from ml.config import PipelineConfig
from ml.data import Snapshot, fingerprint, read_snapshot, split_examples, to_example, write_snapshot, write_splits
from ml.errors import ConfigError, DataError, GateFailed
from ml.identity import config_hash
from ml.runs import RunPaths, read_json, write_json

log = logging.getLogger(__name__)

# How a step reaches the tracking server may change between attempts of one run (and a URI with
# credentials is never frozen): every other setting of a run is the frozen one.
CONNECTION = ("registry.tracking_uri",)


def freeze(cfg: PipelineConfig, paths: RunPaths, first: bool = False) -> PipelineConfig:
    """The run's effective config, written once when it starts; later steps read this copy, so a
    profile edited mid-run changes nothing in it. The `first` step (load) refuses a folder that holds
    a run of other settings: a run key reused with another config starts nothing, never a mix."""
    if not paths.config.exists():
        write_json(paths.config, cfg.model_dump(mode="json"))
        return cfg
    frozen = PipelineConfig.model_validate(read_json(paths.config))
    if first:
        now, then = cfg.flat(), frozen.flat()
        changed = [k for k in now if k not in CONNECTION and now[k] != then.get(k)]
        if changed:
            shown = ", ".join(f"{k} {then.get(k)!r} -> {now[k]!r}" for k in changed[:3])
            raise ConfigError(f"run key {paths.key!r} already holds a run with other settings ({shown}"
                              f"{', ...' if len(changed) > 3 else ''}): use a new run key, or delete {paths.root}")
    return frozen


def load(cfg: PipelineConfig, paths: RunPaths) -> Snapshot:
    """The rows as the source has them now, frozen in the run folder. A folder that holds a snapshot of
    other rows (a run key reused after the data changed) is refused before anything is written."""
    from ml.sources import load_records  # pandas, and datasets for a hub source

    records = load_records(cfg.data)
    if paths.snapshot.exists():
        before, now = read_json(paths.snapshot)["fingerprint"], fingerprint(records)
        if before != now:
            raise DataError(f"run key {paths.key!r} already holds a run on other data (fingerprint "
                            f"{before[:16]}, the source has {now[:16]} now): use a new run key, or delete {paths.root}")
    return write_snapshot(records, cfg.data.source, paths.data)


def preflight(cfg: PipelineConfig, paths: RunPaths, run_key: str | None = None, force: bool = False) -> str | None:
    """Before any GPU time: the registry must answer and take this run's writes (else
    RegistryUnavailable, naming the tracking URI); then, unless `force`, why this run would
    repeat the champion's training (same data fingerprint, training settings and base model), or None.
    With a run key, a skip is noted in MLflow as a finished run that says so."""
    from ml import champion, tracking  # MLflow

    client = tracking.check_writable(cfg.registry)
    if force:
        return None
    snap, config = read_json(paths.snapshot), config_hash(cfg)
    tags = champion.tags(client, cfg.registry)
    if not (tags and tags.get("data_fingerprint") == snap["fingerprint"] and tags.get("config_sha256") == config):
        return None
    from ml.base_models import current_identity  # transformers, the hub

    base = current_identity(cfg.model.base_model, cfg.model.revision)
    if base is None or base != tags.get("base_identity"):
        log.info("training: the base model %s is %s now, champion v%s was trained on %s", cfg.model.base_model,
                 base or "of unknown identity (the hub does not answer)", tags["version"], tags.get("base_identity"))
        return None
    reason = (f"nothing changed since champion v{tags['version']}: the same data (fingerprint "
              f"{snap['fingerprint'][:16]}), the same training settings ({config}) and the same base model "
              f"({base}); trigger with force=true to train anyway")
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
        raise GateFailed(report.summary())  # said once: by the CLI's error line or the failed task's log
    log.info(report.summary())
    return {"success": True, "expectations": len(report.checks), "rows": report.rows,
            "truncated_share": report.truncated_share}


def prepare(cfg: PipelineConfig, paths: RunPaths) -> dict[str, int]:
    examples = [to_example(r) for r in read_snapshot(paths.data)]
    counts = write_splits(split_examples(examples, cfg.data), paths.splits)
    write_json(paths.split_counts, counts)
    return counts
