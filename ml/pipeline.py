"""The pipeline's steps as plain functions over a run folder.

The Airflow DAG calls these one per task; `python -m ml <step>` and
`python -m ml pipeline` call the same functions without Airflow. Each step
reads what earlier steps wrote under the run folder (ml/runs.py) and writes its
own result there as JSON, so a task can be retried, or run on another worker
that shares the folder, without passing anything large through XCom.

Each step imports the part of the ML stack it needs as it runs. An Airflow task
is a process of its own: importing every domain module takes about 12 s on two
cores (docs/benchmarks.md) where a step needs a part of it, and the CUDA worker's
train step needs neither MLflow nor Great Expectations.
"""

from __future__ import annotations

import collections
import logging
import multiprocessing
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import asdict, replace
from typing import Any

from ml import configure_logging
from ml.config import PipelineConfig
from ml.data import Snapshot, read_snapshot, read_split, split_examples, to_example, write_splits
from ml.errors import GateFailed, TrainingFailed
from ml.runs import RunPaths, read_champion, read_json, run_paths, write_champion, write_json
from ml.warm import warm_up_later_steps

log = logging.getLogger(__name__)


def load(cfg: PipelineConfig, paths: RunPaths) -> Snapshot:
    from ml.sources import snapshot

    return snapshot(cfg.data, paths.data)


def validate(cfg: PipelineConfig, paths: RunPaths, run_key: str | None = None,
             checked: Future[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The data-quality gate (`gate`, or its outcome from another process: `checked`). On failure,
    with a run key, the reports are logged to MLflow as a run tagged failed (so reviewers see why a
    retrain did not happen) and `GateFailed` stops the pipeline: nothing is trained or registered."""
    try:
        return checked.result() if checked else gate(cfg, paths)
    except GateFailed:
        if run_key:
            from ml.tracking import log_failed_validation

            log_failed_validation(cfg, run_key, paths.root, read_json(paths.data / "snapshot.json"))
        raise


def gate(cfg: PipelineConfig, paths: RunPaths) -> dict[str, Any]:
    """The gate on the run's snapshot (ml/validate.py), its report in the run folder; `GateFailed` if it fails."""
    from ml.validate import gate_tokenizer
    from ml.validate import validate as run_gate

    report = run_gate(read_snapshot(paths.data), cfg, gate_tokenizer(cfg))
    report.write(paths.reports / "validation.json")
    if not report.success:
        raise GateFailed(report.summary())
    return {"success": True, "expectations": len(report.checks), "rows": report.rows,
            "truncated_share": report.truncated_share}


def prepare(cfg: PipelineConfig, paths: RunPaths) -> dict[str, int]:
    examples = [to_example(r) for r in read_snapshot(paths.data)]
    counts = write_splits(split_examples(examples, cfg.data), paths.splits)
    write_json(paths.reports / "splits.json", counts)
    return counts


def train(cfg: PipelineConfig, paths: RunPaths, run_key: str | None = None,
          opened: Callable[[str], None] | None = None, meanwhile: Callable[[], None] | None = None) -> dict[str, Any]:
    """Train in a child process (`train.isolate`, the default) or in this one. The champion is
    fetched first, so that the trainer can score the challenger against it while its model is
    still loaded (`eval.score_while_loaded`). The attempt is an MLflow run while it trains
    (`tracking.TrainingRun`: its metrics live, system metrics, FAILED with the log's tail if it
    fails; `opened` is told its id at once); register continues it. `meanwhile` runs in a thread
    while a child trains (`run_all`: ml/warm.py); training in this process leaves no time for it."""
    from ml.tracking import TrainingRun

    paths.scores.unlink(missing_ok=True)  # an earlier attempt's scores are not this adapter's
    if cfg.eval.score_while_loaded:
        fetch_champion(cfg, paths)
    with TrainingRun(cfg, run_key or paths.root.name, paths.train) as run:
        if opened:
            opened(run.run_id)
        if not cfg.train.isolate:
            from ml.backend import train_here

            return asdict(train_here(cfg, paths.splits, paths.train, score_in=paths))
        return _train_in_child(cfg, paths, meanwhile)


def _stop(proc: subprocess.Popen[str]) -> None:
    """Terminate a child that is still running, then kill it if it does not end within 30 s."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def training_command(cfg: PipelineConfig, paths: RunPaths) -> list[str]:
    """The child's command line; the run's resolved config travels as a file in the run folder."""
    config_file = paths.root / "config.json"
    write_json(config_file, cfg.model_dump(mode="json"))
    return [sys.executable, "-m", "ml", "train", "--config", str(config_file), "--run-key", paths.root.name]


def _train_in_child(cfg: PipelineConfig, paths: RunPaths,
                    meanwhile: Callable[[], None] | None = None) -> dict[str, Any]:
    """`python -m ml train` with this run's resolved config; its log lines stream into ours.

    The child owns the GPU: when it ends, CUDA memory goes back to the worker, and an
    OOM or crash becomes a failed task (with the tail of its output) instead of a dead worker.
    A child still running at its time limit (`TrainConfig.timeout_s`) is stopped the same way;
    the task's retry resumes from the last checkpoint.
    """
    cmd = training_command(cfg, paths)
    rows = sum(1 for _ in (paths.splits / "train.jsonl").open(encoding="utf-8"))
    limit = cfg.train.timeout_s(rows)
    log.info("starting training process (time limit %.0f s for %d steps): %s", limit,
             cfg.train.optimizer_steps(rows), " ".join(cmd))
    tail: collections.deque[str] = collections.deque(maxlen=40)
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, bufsize=1,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", "ML_LOG_FORMAT": "%(name)s: %(message)s"})
    expired = threading.Event()

    def expire() -> None:
        expired.set()
        _stop(proc)

    timer = threading.Timer(limit, expire)
    timer.start()
    side = threading.Thread(target=meanwhile, name="meanwhile", daemon=True) if meanwhile else None
    if side:
        side.start()
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip()
            tail.append(line)
            log.info("[train] %s", line)
        rc = proc.wait()
    finally:
        timer.cancel()
        _stop(proc)  # this task was stopped (Airflow's own timeout, a kill): do not leave the GPU busy
        if side:
            side.join()
    if expired.is_set() and rc != 0:
        raise TrainingFailed(f"training did not finish within its time limit of {limit:.0f} s "
                             f"(train.timeout_per_step_s x {cfg.train.optimizer_steps(rows)} steps + "
                             f"train.timeout_startup_s, at most train.timeout_cap_h) and was stopped; a retry "
                             "resumes from the last checkpoint. Last output:\n" + "\n".join(tail))
    if rc != 0:
        text = "\n".join(tail)
        hint = ("; CUDA ran out of memory: lower train.per_device_train_batch_size (raising "
                "gradient_accumulation_steps keeps the optimisation the same) or model.max_seq_length"
                if "out of memory" in text.lower() else "")
        how = f"was killed by signal {-rc}" if rc < 0 else f"exited with code {rc}"
        raise TrainingFailed(f"training process {how}{hint}. Last output:\n{text}")
    seconds = time.perf_counter() - started
    log.info("the training process ended after %.1fs", seconds)
    return {**read_json(paths.train / "train_result.json"), "process_s": round(seconds, 1)}


def fetch_champion(cfg: PipelineConfig, paths: RunPaths) -> Any:
    """The champion this run competes with (None: the base model), downloaded into the run folder,
    unless that version is there already (`run_all` fetched it while the gate ran; an earlier attempt)."""
    from ml.registry import champion, champion_version

    fetched, champ = read_champion(paths.champion)  # written once the download is complete
    if fetched and (champ.version if champ else None) == champion_version(cfg.registry):
        return champ
    shutil.rmtree(paths.champion, ignore_errors=True)
    champ = champion(cfg.registry, paths.champion)
    write_champion(paths.champion, champ)
    return champ


def evaluate(cfg: PipelineConfig, paths: RunPaths) -> dict[str, Any]:
    """Challenger vs champion (or the bare base model) on the same test rows, each model with its
    own prompt settings (ml/scoring.py), and the decision (ml/promotion.py) with what it depends on.
    Scores the trainer wrote while its model was loaded are used while they still stand."""
    from ml.identity import row_hashes
    from ml.promotion import RowScore, Scores
    from ml.registry import champion_version

    scores = current_scores(paths, champion_version(cfg.registry)) if cfg.eval.score_while_loaded else None
    if scores is None:
        from ml.modeling import load_with_adapter
        from ml.scoring import score

        champ = fetch_champion(cfg, paths)
        model, tokenizer = load_with_adapter(cfg.model, paths.train / "adapter")
        scores = score(cfg, paths, model, tokenizer, champ, "evaluate step")
    test = read_split(paths.splits, "test")
    write_json(paths.reports / "train_rows.json", row_hashes(read_split(paths.splits, "train")))

    challenger, baseline, name = scores["challenger"], scores["baseline"], scores["baseline_name"]
    decision = decide_from(cfg, Scores([RowScore(**r) for r in challenger["rows"]], scores["identity"]["tokenizer"]),
                           Scores([RowScore(**r) for r in baseline["rows"]], scores["baseline_tokenizer"]),
                           name, set(scores["excluded_rows"]))
    review = scores["review"]
    if review and decision.outcome != "needs_review":
        decision = replace(decision, outcome="needs_review",
                           reason=f"NEEDS REVIEW: {review}; scores: {decision.reason}")
    log.info("decision: %s", decision.reason)

    decisions = collections.Counter(ex.decision for ex in test if ex.decision and cfg.data.lead_with_decision)
    report = {"challenger": challenger, "baseline": baseline, "baseline_name": name,
              "champion_version": scores["champion_version"], "decision": asdict(decision),
              "identity": scores["identity"], "excluded_rows": scores["excluded_rows"],
              "scored_in": scores["scored_in"],
              # what always answering the most common decision scores on this test split
              "decision_majority_share": max(decisions.values()) / sum(decisions.values()) if decisions else None,
              "samples": scores["samples"]}
    write_json(paths.reports / "evaluation.json", report)
    return {"challenger_loss": challenger["loss"], "baseline_loss": baseline["loss"],
            "baseline": name, "promote": decision.promote, "outcome": decision.outcome}


def current_scores(paths: RunPaths, champion_version: str | None) -> dict[str, Any] | None:
    """The run's scores (ml/scoring.py) while they still stand for its adapter, its test rows and the
    champion now holding the alias; else None, and the evaluate step scores again."""
    from ml.identity import adapter_hash, keys_hash

    if not paths.scores.exists():
        return None
    record = read_json(paths.scores)
    identity = record["identity"]
    then_now = {"@champion": (record["champion_version"], champion_version),
                "adapter": (identity["adapter_sha256"], adapter_hash(paths.train / "adapter")),
                "test rows": (identity["test_keys"], keys_hash(ex.key for ex in read_split(paths.splits, "test")))}
    changed = [f"{what} {then} -> {now}" for what, (then, now) in then_now.items() if then != now]
    if changed:
        log.info("the scores of the %s no longer stand (%s): scoring again", record["scored_in"], "; ".join(changed))
        return None
    return record  # type: ignore[no-any-return]


def decide_from(cfg: PipelineConfig, challenger: Any, baseline: Any, baseline_name: str, exclude: set[str]) -> Any:
    from ml.promotion import decide

    r = cfg.registry
    return decide(challenger, baseline, baseline_name, min_delta=r.min_delta, confidence=r.confidence,
                  resamples=r.bootstrap_resamples, seed=r.bootstrap_seed, min_rows=r.min_rows, exclude=exclude)


def review_card(cfg: PipelineConfig, paths: RunPaths, decision: dict[str, Any]) -> str:
    """The version's review card (ml/review_card.py) from the run folder and the champion's run."""
    from ml.registry import run_params
    from ml.review_card import config_changes, render, row_changes

    _, champ = read_champion(paths.champion)
    ev = read_json(paths.reports / "evaluation.json")
    if champ is None or ev["champion_version"] != champ.version:
        champ = None  # the card compares with the champion that was scored
    params = run_params(cfg.registry, champ.run_id) if champ and champ.run_id else None
    links = read_json(paths.reports / "links.json") if (paths.reports / "links.json").exists() else {}
    return render(decision, ev, read_json(paths.data / "snapshot.json"), read_json(paths.train / "train_result.json"),
                  config_changes(cfg.flat(), params),
                  row_changes(read_json(paths.reports / "train_rows.json"), champ.trained_rows if champ else None),
                  links)


def register(cfg: PipelineConfig, paths: RunPaths, run_key: str, tags: dict[str, str] | None = None,
             links: dict[str, str] | None = None) -> dict[str, str]:
    """Log the run to MLflow and register its adapter as a version described by its review card;
    `links`: where the run can be seen (the Airflow run, its task logs), shown on the card."""
    from ml.promotion import Decision
    from ml.registry import log_and_register

    ev = read_json(paths.reports / "evaluation.json")
    _same_adapter(paths, ev)
    snap = read_json(paths.data / "snapshot.json")
    tr = read_json(paths.train / "train_result.json")
    decision = Decision(**ev["decision"])
    metrics = {"test_loss": ev["challenger"]["loss"], "baseline_test_loss": ev["baseline"]["loss"],
               "test_answer_tokens": ev["challenger"]["tokens"], "final_train_loss": tr["train_loss"],
               "train_runtime_s": tr["runtime_s"], "train_examples": tr["train_examples"],
               "truncated_train_examples": tr["truncated_examples"], "dataset_rows": snap["rows"],
               "test_rows_compared": decision.rows}
    interval = {"challenger_nats_per_byte": decision.challenger_nats_per_byte,
                "baseline_nats_per_byte": decision.baseline_nats_per_byte, "improvement": decision.improvement,
                "improvement_low": decision.low, "improvement_high": decision.high}
    metrics.update({k: v for k, v in interval.items() if v is not None})
    if tr["eval_loss"] is not None:
        metrics["final_val_loss"] = tr["eval_loss"]
    for prefix, result in (("", ev["challenger"]), ("baseline_", ev["baseline"])):
        if result.get("decision_accuracy") is not None:
            metrics[f"{prefix}test_decision_accuracy"] = result["decision_accuracy"]
    if ev.get("decision_majority_share") is not None:
        metrics["test_decision_majority_share"] = ev["decision_majority_share"]
    all_tags = {"data_fingerprint": snap["fingerprint"], "data_source": snap["source"],
                "config_sha256": config_hash(cfg), **ev["identity"], **(tags or {})}
    if links is not None:
        write_json(paths.reports / "links.json", links)
    reg = log_and_register(cfg, run_key, paths.root, tags=all_tags, metrics=metrics, decision=decision,
                           samples=ev["samples"], card=review_card(cfg, paths, ev["decision"]))
    write_json(paths.reports / "registered.json", asdict(reg))
    return asdict(reg)


def _same_adapter(paths: RunPaths, ev: dict[str, Any]) -> str:
    """The adapter on disk must be the one evaluated (a re-run under the same key may have replaced it)."""
    from ml.errors import RegistryConflict
    from ml.identity import adapter_hash

    now, evaluated = adapter_hash(paths.train / "adapter"), ev["identity"]["adapter_sha256"]
    if now != evaluated:
        raise RegistryConflict(f"the adapter in {paths.train} ({now}) is not the one evaluated ({evaluated}): "
                               "another attempt rewrote it; run evaluate again")
    return str(now)


def _decided(paths: RunPaths) -> tuple[Any, Any, dict[str, Any]]:
    """(Registered, Decision, evaluation report) of this run, as register and evaluate wrote them."""
    from ml.promotion import Decision
    from ml.registry import Registered

    ev = read_json(paths.reports / "evaluation.json")
    return Registered(**read_json(paths.reports / "registered.json")), Decision(**ev["decision"]), ev


def promote(cfg: PipelineConfig, paths: RunPaths, run_key: str | None = None) -> dict[str, Any]:
    """Move @champion to this run's version: only a version its evaluation chose, holding the adapter
    that was evaluated, and only while @champion is still where it was when it was evaluated.

    If the champion moved meanwhile: moved by another pipeline run, the challenger is scored again
    against the new champion and decided anew; moved by a person (a manual promotion or rollback),
    the decision becomes needs_review."""
    from ml.registry import (
        champion_set_by,
        champion_version,
        check_adapter,
        describe_version,
        promote_version,
        registry_lock,
    )

    registered, decision, ev = _decided(paths)
    if not decision.promote:
        raise RuntimeError(f"version {registered.version} was not chosen for promotion: {decision.reason}")
    adapter = _same_adapter(paths, ev)
    check_adapter(cfg.registry, registered, adapter)
    key = run_key or paths.root.name
    with registry_lock(cfg.registry):
        now, expected = champion_version(cfg.registry), ev["champion_version"]
        # now == this version: a retry of an attempt that moved the alias; it finishes the bookkeeping
        if now not in (expected, registered.version):
            set_by = champion_set_by(cfg.registry)
            log.warning("@%s moved from %s to %s since this run was evaluated (%s)", cfg.registry.champion_alias,
                        expected, now, set_by)
            if set_by.startswith("manual"):
                reason = (f"NEEDS REVIEW: @{cfg.registry.champion_alias} was moved by hand ({set_by}) to v{now} after "
                          f"this run was evaluated against {decision.baseline}; a person's choice is not overridden. "
                          f"Scores then: {decision.reason}")
                decision = replace(decision, outcome="needs_review", reason=reason)
                _write_decision(paths, ev, decision)
                return keep(cfg, paths)
            evaluate(cfg, paths)  # against the new champion, under the lock: nothing moves meanwhile
            registered, decision, ev = _decided(paths)
            if not decision.promote:
                return keep(cfg, paths)
        promote_version(cfg.registry, registered, decision, now, key)  # re-checked there: still `now`
    describe_version(cfg.registry, registered.version, review_card(cfg, paths, asdict(decision)))
    return {"version": registered.version, "promoted": True, "outcome": "promote", "reason": decision.reason}


def _write_decision(paths: RunPaths, ev: dict[str, Any], decision: Any) -> None:
    write_json(paths.reports / "evaluation.json", {**ev, "decision": asdict(decision)})


def final_decision(paths: RunPaths) -> dict[str, Any]:
    """The decision as it stands after promote or keep (promotion may have re-scored it)."""
    return read_json(paths.reports / "evaluation.json")["decision"]  # type: ignore[no-any-return]


def keep(cfg: PipelineConfig, paths: RunPaths) -> dict[str, Any]:
    """Keep the champion: tag this run's version rejected (or needs_review), with the reason."""
    from ml.registry import describe_version, reject_version

    registered, decision, _ = _decided(paths)
    reject_version(cfg.registry, registered, decision)
    describe_version(cfg.registry, registered.version, review_card(cfg, paths, asdict(decision)))
    return {"version": registered.version, "promoted": False, "outcome": decision.outcome, "reason": decision.reason}


def config_hash(cfg: PipelineConfig) -> str:
    """The effective config, minus where the run writes: equal hashes train the same way."""
    import hashlib
    import json

    body = cfg.model_dump(mode="json", exclude={"output_dir", "description", "schedule"})
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]


def freeze(cfg: PipelineConfig, paths: RunPaths) -> PipelineConfig:
    """The run's effective config, written once when it starts; later steps read this copy, so a
    profile edited mid-run changes nothing in it."""
    frozen = paths.root / "config.json"
    if frozen.exists():
        return PipelineConfig.model_validate(read_json(frozen))
    write_json(frozen, cfg.model_dump(mode="json"))
    return cfg


def preflight(cfg: PipelineConfig, paths: RunPaths, run_key: str | None = None, force: bool = False) -> str | None:
    """Before any GPU time: the registry must answer and take this run's writes (else
    RegistryUnavailable, naming the tracking URI); then, unless `force`, why this run would
    repeat the champion's training (`unchanged`), or None."""
    from ml.tracking import check_writable

    check_writable(cfg.registry)
    return None if force else unchanged(cfg, paths, run_key)


def unchanged(cfg: PipelineConfig, paths: RunPaths, run_key: str | None = None) -> str | None:
    """Why training would repeat the champion's (same data fingerprint, same effective config), or
    None. With a run key, a skip is noted in MLflow as a finished run that says so."""
    from ml.registry import champion_tags
    from ml.tracking import log_skipped

    snap, config = read_json(paths.data / "snapshot.json"), config_hash(cfg)
    tags = champion_tags(cfg.registry)
    if not (tags and tags.get("data_fingerprint") == snap["fingerprint"] and tags.get("config_sha256") == config):
        return None
    reason = (f"nothing changed since champion v{tags['version']}: the same data (fingerprint "
              f"{snap['fingerprint'][:16]}) and the same effective config ({config}); "
              "trigger with force=true to train anyway")
    log.info("skipping: %s", reason)
    if run_key:
        log_skipped(cfg, run_key, reason, snap)
    return reason


def run_all(cfg: PipelineConfig, run_key: str, force: bool = False) -> dict[str, Any]:
    """Every step in order, without Airflow; the wall time of each comes back as `seconds`.
    Unless `force`, a run whose data and config equal the champion's stops after loading. The gate
    runs in a spawned worker process: a script calling this needs `if __name__ == "__main__":`."""
    paths = run_paths(cfg, run_key)
    cfg = freeze(cfg, paths)
    seconds: dict[str, float] = {}

    def timed(name: str, step: Any, *args: Any) -> Any:
        start = time.perf_counter()
        out = step(cfg, paths, *args)
        seconds[name] = round(time.perf_counter() - start, 1)
        log.info("step %s took %.1fs", name, seconds[name])
        return out

    snap = timed("load", load)
    # The gate runs in a worker process (the only one that imports Great Expectations) while this one runs
    # preflight and fetches the champion; nothing trains before the gate has passed. A skipped run or a
    # failed preflight leaves the gate to finish on its own (its report is written; its outcome unused).
    pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"), initializer=configure_logging)
    checked = pool.submit(gate, cfg, paths)
    try:
        skipped = timed("preflight", preflight, run_key, force)
        if skipped:
            return {"run_dir": str(paths.root), "fingerprint": snap.fingerprint, "skipped": skipped,
                    "seconds": seconds}
        if cfg.eval.score_while_loaded:
            timed("champion", fetch_champion)
        timed("validate", validate, run_key, checked)  # the wait for the gate, once this process is done
    finally:
        pool.shutdown(wait=False, cancel_futures=True)  # the worker's own exit is not waited for
    timed("prepare", prepare)
    warm = warm_up_later_steps if cfg.train.warm_up_later_steps else None  # while the child trains
    trained = timed("train", train, run_key, None, warm)
    if "process_s" in trained:  # of which the trainer's process (the rest: the MLflow run opened and closed)
        seconds["train process"] = trained["process_s"]
    promoted = timed("evaluate", evaluate)["promote"]
    timed("register", register, run_key)
    result = timed("promote", promote, run_key) if promoted else timed("keep", keep)
    return {"run_dir": str(paths.root), "fingerprint": snap.fingerprint, **result, "seconds": seconds}
