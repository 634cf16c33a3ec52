"""A run's evaluation record (reports/evaluation.json): the scores that were judged and the
promotion rule's decision on them. ml/evaluate.py measures and ml/scoring.py scores the two
models; this module decides whether those scores still stand, judges them and records the result
that register, promote and keep read. It loads no model.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from ml.config import PipelineConfig
from ml.data import QAExample, read_split
from ml.identity import adapter_hash, keys_hash
from ml.promotion import Decision, Rule, judge
from ml.runs import RunPaths, read_json, write_json

log = logging.getLogger(__name__)


def standing_scores(paths: RunPaths, champion_version: str | None) -> dict[str, Any] | None:
    """The run's scores (ml/scoring.py) while they still stand for its adapter, its test rows and the
    champion now holding the alias; else None, and the caller scores again."""
    if not paths.scores.exists():
        return None
    record = read_json(paths.scores)
    identity = record["identity"]
    then_now = {"@champion": (record["champion_version"], champion_version),
                "adapter": (identity["adapter_sha256"], adapter_hash(paths.trained.adapter)),
                "test rows": (identity["test_keys"], keys_hash(ex.key for ex in read_split(paths.splits, "test")))}
    changed = [f"{what} {then} -> {now}" for what, (then, now) in then_now.items() if then != now]
    if changed:
        log.info("the scores of the %s no longer stand (%s): scoring again", record["scored_in"], "; ".join(changed))
        return None
    return record  # type: ignore[no-any-return]


def conclude(cfg: PipelineConfig, paths: RunPaths, scores: dict[str, Any]) -> dict[str, Any]:
    """Judge the scores (ml.promotion.judge) and write the evaluation record; returns it."""
    decision = judge(scores, Rule.of(cfg.registry))
    log.info("decision: %s", decision.reason)
    test = read_split(paths.splits, "test")
    record = {**{k: scores[k] for k in ("challenger", "baseline", "baseline_name", "champion_version")},
              "decision": asdict(decision),
              **{k: scores[k] for k in ("identity", "excluded_rows", "scored_in")},
              "decision_majority_share": majority_share(test) if cfg.data.lead_with_decision else None,
              "samples": scores["samples"]}
    write_json(paths.evaluation, record)
    return record


def majority_share(test: Sequence[QAExample]) -> float | None:
    """What always answering the most common yes/no/maybe decision scores on these rows."""
    counts = collections.Counter(ex.decision for ex in test if ex.decision)
    return max(counts.values()) / sum(counts.values()) if counts else None


def metrics(record: dict[str, Any], snap: dict[str, Any], trained: dict[str, Any]) -> dict[str, float]:
    """The run's numbers as MLflow logs them: the evaluation record's, the snapshot's and the training's."""
    decision = record["decision"]
    out = {"test_loss": record["challenger"]["loss"], "baseline_test_loss": record["baseline"]["loss"],
           "test_answer_tokens": record["challenger"]["tokens"], "final_train_loss": trained["train_loss"],
           "train_runtime_s": trained["runtime_s"], "train_examples": trained["train_examples"],
           "truncated_train_examples": trained["truncated_examples"], "dataset_rows": snap["rows"],
           "test_rows_compared": decision["rows"]}
    interval = {"challenger_nats_per_byte": decision["challenger_nats_per_byte"],
                "baseline_nats_per_byte": decision["baseline_nats_per_byte"], "improvement": decision["improvement"],
                "improvement_low": decision["low"], "improvement_high": decision["high"]}
    out.update({k: v for k, v in interval.items() if v is not None})
    if trained["eval_loss"] is not None:
        out["final_val_loss"] = trained["eval_loss"]
    for prefix, result in (("", record["challenger"]), ("baseline_", record["baseline"])):
        if result.get("decision_accuracy") is not None:
            out[f"{prefix}test_decision_accuracy"] = result["decision_accuracy"]
    if record.get("decision_majority_share") is not None:
        out["test_decision_majority_share"] = record["decision_majority_share"]
    for g in decision.get("guardrails") or ():
        if g["challenger"] is not None:
            name = f"guardrail_{g['metric']}"
            out.update({name: g["challenger"], f"baseline_{name}": g["baseline"], f"{name}_low": g["low"],
                        f"{name}_high": g["high"]})
    return out


def read(paths: RunPaths) -> tuple[Decision, dict[str, Any]]:
    """(the decision, the whole record) as the last evaluation or release step left them."""
    record = read_json(paths.evaluation)
    return Decision.from_dict(record["decision"]), record


def redecide(paths: RunPaths, record: dict[str, Any], decision: Decision) -> None:
    """The record with another decision (a person moved the champion before this run's promotion)."""
    write_json(paths.evaluation, {**record, "decision": asdict(decision)})
