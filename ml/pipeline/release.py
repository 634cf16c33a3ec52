"""The release steps: register (the run's evidence and a model version), then promote or keep (the
only moves of @champion a run makes, through ml/champion.py), and the decision as it stands after
them. Where a person must approve (registry.approval: required), the DAG's approval gate asks with
`approval_request` and records the answer with `record_review`; promote and keep apply it."""

from __future__ import annotations

import logging
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from ml import evaluation
from ml.config import PipelineConfig, load_config
from ml.data import read_split
from ml.errors import ConfigError, RegistryConflict
from ml.identity import adapter_hash
from ml.promotion import Decision, Review, awaiting_approval, describe, overruled, reviewed
from ml.review_card import commands, config_changes, render, row_changes
from ml.runs import RunPaths, read_champion, read_json, write_json

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from ml.registry import Registered

log = logging.getLogger(__name__)


def register(cfg: PipelineConfig, paths: RunPaths, run_key: str, tags: dict[str, str] | None = None,
             links: dict[str, str] | None = None) -> dict[str, str]:
    """Log the run's evidence to MLflow and register its adapter as a version described by its review
    card; `links`: where the run can be seen (the Airflow run, its task logs), shown on the card. A
    retry finds the version its earlier attempt registered for this adapter instead of adding one."""
    from ml import registry, tracking  # MLflow

    decision, ev = evaluation.read(paths)
    adapter = _evaluated_adapter(paths, ev)
    if links is not None:
        write_json(paths.links, links)
    client = tracking.connect(cfg.registry)
    registered = registry.find_registered(client, cfg.registry, run_key, adapter)
    if registered:
        log.info("run %s already registered version %s; not registering again", run_key, registered.version)
        tracking.finish_run(client, registered.run_id)
    else:
        snap = read_json(paths.snapshot)
        metrics = evaluation.metrics(ev, snap, read_json(paths.trained.result))
        run_tags = tracking.evidence_tags(cfg, run_key, ev, snap, tags or {})
        with tracking.evidence_run(client, cfg, paths, run_key, metrics=metrics, tags=run_tags, decision=decision,
                                   samples=ev["samples"]) as (run_id, datasets):
            test_metrics = {k: v for k, v in metrics.items() if k.startswith(("test_", "baseline_test_"))}
            registered = registry.publish(client, cfg, paths.trained.adapter, run_id, run_tags, test_metrics,
                                          datasets.get("test"))
    registry.tag_numbers(client, cfg.registry, registered.version, decision)
    card = _review_card(client, cfg, paths, decision, registered.version)  # its commands name the version
    paths.card.write_text(card, encoding="utf-8")
    registry.describe(client, cfg.registry, registered.version, card)
    write_json(paths.registered, asdict(registered))
    return asdict(registered)


def promote(cfg: PipelineConfig, paths: RunPaths, run_key: str | None = None) -> dict[str, Any]:
    """Move @champion to this run's version: only a version its evaluation chose, holding the adapter
    that was evaluated, and only while @champion is still where it was when it was evaluated.

    If the champion moved meanwhile: moved by another pipeline run, the challenger is scored again
    against the new champion and decided anew; moved by a person (a manual promotion or rollback),
    the decision becomes needs_review. Either way a version not promoted is kept, as by `keep`."""
    from ml import champion, registry, tracking  # MLflow

    registered, (decision, ev) = _registered(paths), evaluation.read(paths)
    if not decision.promote:
        raise RuntimeError(f"version {registered.version} was not chosen for promotion: {decision.reason}")
    reg, client = cfg.registry, tracking.connect(cfg.registry)
    registry.check_adapter(client, reg, registered, _evaluated_adapter(paths, ev))
    if reg.approval == "required" and decision.review is None:
        if not paths.review.exists():
            raise RuntimeError(f"version {registered.version} needs a person's approval (registry.approval: required) "
                               "and none is recorded: promote it by hand with python -m ml promote --version "
                               f"{registered.version} --reason ...")
        decision = reviewed(decision, Review(**read_json(paths.review)))
        evaluation.redecide(paths, ev, decision)
    with champion.lock(client, reg):
        expected = ev["champion_version"]
        moved = champion.moved_since(client, reg, expected, registered.version)
        if moved and moved.by_hand:  # a person's choice is not overridden
            decision = overruled(decision, reg.champion_alias, moved.now, moved.set_by)
            evaluation.redecide(paths, ev, decision)
        elif moved:  # another run promoted: against the new champion, under the lock (nothing moves meanwhile)
            from ml.scoring import score_again  # torch, transformers

            scores = score_again(cfg, paths, champion.fetch(client, reg, paths.champion), "promote step")
            record = evaluation.conclude(cfg, paths, scores)
            decision, expected = Decision.from_dict(record["decision"]), moved.now
            if approved := (Review(**read_json(paths.review)) if paths.review.exists() else None):
                decision = reviewed(decision, approved)  # the person's approval holds for the same version
                evaluation.redecide(paths, record, decision)
        if decision.promote:
            _export(cfg, client, registered.version, paths)  # before the move: with require_export, it may stop it
            champion.promote(client, reg, registered, decision, expected, run_key or paths.key)
        else:
            champion.keep(client, reg, registered, decision)
    registry.describe(client, reg, registered.version, _review_card(client, cfg, paths, decision, registered.version))
    return _outcome(registered, decision)


def manual_move(cfg: PipelineConfig, version: str | None, reason: str) -> dict[str, str | None]:
    """A person's promotion of `version`, or (None) rollback to @previous_champion, with the version
    about to become champion exported first, as the pipeline's promotion does."""
    from ml import champion, tracking  # MLflow

    client = tracking.connect(cfg.registry)
    action = "rollback" if version is None else "promotion"
    return champion.manual_move(client, cfg.registry, version, reason, action,
                                prepare=lambda to: _export(cfg, client, to, None))


def _export(cfg: PipelineConfig, client: MlflowClient, version: str, paths: RunPaths | None) -> None:
    """The merged export of a version about to become champion (ml/export.py), checked on the run's
    test rows (`paths`; else those its MLflow run holds)."""
    if not cfg.registry.export_on_promotion:
        return
    from ml.export import for_promotion  # torch, transformers

    for_promotion(client, cfg, version, read_split(paths.splits, "test") if paths else None)


def keep(cfg: PipelineConfig, paths: RunPaths) -> dict[str, Any]:
    """Keep the champion: tag this run's version rejected (or needs_review), with the reason. A version
    the rule chose is kept only on a person's answer (rejected, or no answer in time), or for want of
    one (registry.approval: required, and nobody to ask: `python -m ml pipeline`)."""
    from ml import champion, registry, tracking  # MLflow

    registered, (decision, ev) = _registered(paths), evaluation.read(paths)
    if decision.promote:
        review = Review(**read_json(paths.review)) if paths.review.exists() else None
        decision = reviewed(decision, review) if review else awaiting_approval(decision)
        evaluation.redecide(paths, ev, decision)
    client = tracking.connect(cfg.registry)
    champion.keep(client, cfg.registry, registered, decision)
    registry.describe(client, cfg.registry, registered.version,
                      _review_card(client, cfg, paths, decision, registered.version))
    return _outcome(registered, decision)


def approval_request(paths: RunPaths) -> dict[str, str]:
    """What a person reads to approve or reject: the version, its run and its review card."""
    registered = read_json(paths.registered)
    return {"version": registered["version"], "run_id": registered["run_id"],
            "card": paths.card.read_text(encoding="utf-8")}


def record_review(paths: RunPaths, answer: dict[str, Any]) -> None:
    """A person's answer to the approval request (or the default, when nobody answered in time)."""
    write_json(paths.review, asdict(Review(**answer)))


def final_decision(paths: RunPaths) -> dict[str, Any]:
    """The decision as it stands after promote or keep (promotion may have scored again), with a line
    per guardrail (`guardrail_lines`) for the log and the notification."""
    decision = evaluation.read(paths)[0]
    return {**asdict(decision), "guardrail_lines": [describe(g, decision.baseline) for g in decision.guardrails]}


def _outcome(registered: Registered, decision: Decision) -> dict[str, Any]:
    return {"version": registered.version, "promoted": decision.promote, "outcome": decision.outcome,
            "reason": decision.reason}


def _registered(paths: RunPaths) -> Registered:
    from ml.registry import Registered  # MLflow

    return Registered(**read_json(paths.registered))


def _evaluated_adapter(paths: RunPaths, ev: dict[str, Any]) -> str:
    """The adapter on disk must be the one evaluated (a re-run under the same key may have replaced it)."""
    now, evaluated = adapter_hash(paths.trained.adapter), ev["identity"]["adapter_sha256"]
    if now != evaluated:
        raise RegistryConflict(f"the adapter in {paths.train} ({now}) is not the one evaluated ({evaluated}): "
                               "another attempt rewrote it; run evaluate again")
    return str(now)


def _review_card(client: MlflowClient, cfg: PipelineConfig, paths: RunPaths, decision: Decision,
                 version: str) -> str:
    """The version's review card (ml/review_card.py) from the run folder and the champion's run, ending
    with the commands that roll back or promote this version in this registry."""
    import mlflow

    from ml.tracking import run_params  # MLflow

    _, champ = read_champion(paths.champion)
    ev = read_json(paths.evaluation)
    if champ is None or ev["champion_version"] != champ.version:
        champ = None  # the card compares with the champion that was scored
    params = run_params(client, champ.run_id) if champ and champ.run_id else None
    links = read_json(paths.links) if paths.links.exists() else {}
    undo = commands(mlflow.get_tracking_uri(), cfg.profile, version, _registry_sets(cfg))
    tags = client.get_model_version(cfg.registry.model_name, version).tags  # its export's, once made
    return render(asdict(decision), ev, read_json(paths.snapshot), read_json(paths.trained.result),
                  config_changes(cfg.flat(), params),
                  row_changes(read_json(paths.train_rows), champ.trained_rows if champ else None), links,
                  awaiting_approval=cfg.registry.approval == "required", undo=undo, export=tags)


def _registry_sets(cfg: PipelineConfig) -> dict[str, str]:
    """The registry names this run set apart from its profile (the trigger form or --set), which the
    CLI's commands must repeat to reach the same model and aliases."""
    try:
        profile = load_config(cfg.profile).registry
    except ConfigError:  # a profile given as a path that is gone: name everything
        profile = None
    keys = ("model_name", "champion_alias", "previous_alias")
    return {f"registry.{k}": getattr(cfg.registry, k) for k in keys
            if profile is None or getattr(profile, k) != getattr(cfg.registry, k)}
