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
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ml.config import PipelineConfig
from ml.data import Snapshot, read_snapshot, read_split, snapshot, split_examples, to_example, write_splits
from ml.errors import GateFailed, TrainingFailed
from ml.runs import RunPaths, read_json, run_paths, write_json

log = logging.getLogger(__name__)


def load(cfg: PipelineConfig, paths: RunPaths) -> Snapshot:
    return snapshot(cfg.data, paths.data)


def validate(cfg: PipelineConfig, paths: RunPaths, run_key: str | None = None) -> dict[str, Any]:
    """The data-quality gate on the snapshot. On failure, with a run key, the reports are logged
    to MLflow as a run tagged failed (so reviewers see why a retrain did not happen) and
    `GateFailed` stops the pipeline: nothing is trained or registered."""
    from ml.validate import gate_tokenizer
    from ml.validate import validate as run_gate

    report = run_gate(read_snapshot(paths.data), cfg, gate_tokenizer(cfg))
    report.write(paths.reports / "validation.json")
    if not report.success:
        if run_key:
            from ml.registry import log_failed_validation

            log_failed_validation(cfg, run_key, paths.root, read_json(paths.data / "snapshot.json"))
        raise GateFailed(report.summary())
    return {"success": True, "expectations": len(report.checks), "rows": report.rows,
            "truncated_share": report.truncated_share}


def prepare(cfg: PipelineConfig, paths: RunPaths) -> dict[str, int]:
    examples = [to_example(r) for r in read_snapshot(paths.data)]
    counts = write_splits(split_examples(examples, cfg.data), paths.splits)
    write_json(paths.reports / "splits.json", counts)
    return counts


def train(cfg: PipelineConfig, paths: RunPaths) -> dict[str, Any]:
    """Train in a child process (`train.isolate`, the default) or in this one."""
    if not cfg.train.isolate:
        from ml.backend import train_here

        return asdict(train_here(cfg, paths.splits, paths.train))
    return _train_in_child(cfg, paths)


def training_command(cfg: PipelineConfig, paths: RunPaths) -> list[str]:
    """The child's command line; the run's resolved config travels as a file in the run folder."""
    config_file = paths.root / "config.json"
    write_json(config_file, cfg.model_dump(mode="json"))
    return [sys.executable, "-m", "ml", "train", "--config", str(config_file), "--run-key", paths.root.name]


def _train_in_child(cfg: PipelineConfig, paths: RunPaths) -> dict[str, Any]:
    """`python -m ml train` with this run's resolved config; its log lines stream into ours.

    The child owns the GPU: when it ends, CUDA memory goes back to the worker, and an
    OOM or crash becomes a failed task (with the tail of its output) instead of a dead worker.
    """
    cmd = training_command(cfg, paths)
    log.info("starting training process: %s", " ".join(cmd))
    tail: collections.deque[str] = collections.deque(maxlen=40)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", "ML_LOG_FORMAT": "%(name)s: %(message)s"})
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip()
            tail.append(line)
            log.info("[train] %s", line)
        rc = proc.wait()
    finally:
        if proc.poll() is None:  # this task was stopped: do not leave the GPU busy behind it
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
    if rc != 0:
        text = "\n".join(tail)
        hint = ("; CUDA ran out of memory: lower train.per_device_train_batch_size (raising "
                "gradient_accumulation_steps keeps the optimisation the same) or model.max_seq_length"
                if "out of memory" in text.lower() else "")
        how = f"was killed by signal {-rc}" if rc < 0 else f"exited with code {rc}"
        raise TrainingFailed(f"training process {how}{hint}. Last output:\n{text}")
    return read_json(paths.train / "train_result.json")  # type: ignore[no-any-return]


def evaluate(cfg: PipelineConfig, paths: RunPaths) -> dict[str, Any]:
    """Challenger vs champion (or the bare base model) on the same test split, in this run."""
    from ml.evaluate import evaluate_model, generate_answers
    from ml.modeling import load_with_adapter
    from ml.prompt import PromptFormat
    from ml.registry import champion, decide

    test = read_split(paths.splits, "test")
    m = cfg.model
    fmt = PromptFormat.from_config(cfg)
    args = (fmt, cfg.eval.batch_size)
    model, tokenizer = load_with_adapter(m, paths.train / "adapter")
    challenger = evaluate_model(model, tokenizer, test, *args)
    log.info("challenger test loss %.4f over %d answer tokens%s", challenger.loss, challenger.tokens,
             _accuracy(challenger))

    shutil.rmtree(paths.champion, ignore_errors=True)
    champ = champion(cfg.registry, paths.champion)
    shown = test[:cfg.eval.num_sample_generations]
    gen_args = (fmt, cfg.eval.max_new_tokens)
    samples = [{"key": ex.key, "question": ex.question, "reference": ex.answer, "challenger": ans}
               for ex, ans in zip(shown, generate_answers(model, tokenizer, shown, *gen_args), strict=True)]

    if champ is None:
        with model.disable_adapter():
            baseline = evaluate_model(model, tokenizer, test, *args)
        baseline_name = "base model"
    else:
        baseline_name = f"champion v{champ.version}"
        if champ.base_model == m.base_model:
            # Same base weights: load the champion as a second adapter instead of a second model
            # (an 8B base in memory once, not twice).
            model.load_adapter(champ.adapter_dir, adapter_name="champion")
            model.set_adapter("champion")
            champ_model, champ_tok = model, tokenizer
        else:
            log.warning("champion v%s was trained on %s, the challenger on %s: losses per token "
                        "compare different tokenizations", champ.version, champ.base_model, m.base_model)
            champ_cfg = m.model_copy(update={"base_model": champ.base_path or champ.base_model})
            champ_model, champ_tok = load_with_adapter(champ_cfg, Path(champ.adapter_dir))
        baseline = evaluate_model(champ_model, champ_tok, test, *args)
        for row, ans in zip(samples, generate_answers(champ_model, champ_tok, shown, *gen_args), strict=True):
            row["champion"] = ans
    log.info("%s test loss %.4f%s", baseline_name, baseline.loss, _accuracy(baseline))
    decision = decide(challenger.loss, baseline.loss, baseline_name, cfg.registry.min_delta)
    log.info("decision: %s", decision.reason)

    decisions = collections.Counter(ex.decision for ex in test if ex.decision and fmt.lead_with_decision)
    report = {"challenger": asdict(challenger), "baseline": asdict(baseline), "baseline_name": baseline_name,
              "champion_version": champ.version if champ else None, "decision": asdict(decision),
              # what always answering the most common decision scores on this test split
              "decision_majority_share": max(decisions.values()) / sum(decisions.values()) if decisions else None,
              "samples": samples}
    write_json(paths.reports / "evaluation.json", report)
    return {"challenger_loss": challenger.loss, "baseline_loss": baseline.loss,
            "baseline": baseline_name, "promote": decision.promote}


def _accuracy(result: Any) -> str:
    return "" if result.decision_accuracy is None else (
        f"; yes/no/maybe read as the first answer word: {result.decision_accuracy:.1%} of {result.decisions}")


def register(cfg: PipelineConfig, paths: RunPaths, run_key: str,
             tags: dict[str, str] | None = None) -> dict[str, str]:
    from ml.registry import Decision, log_and_register

    ev = read_json(paths.reports / "evaluation.json")
    snap = read_json(paths.data / "snapshot.json")
    tr = read_json(paths.train / "train_result.json")
    decision = Decision(**ev["decision"])
    metrics = {"test_loss": ev["challenger"]["loss"], "baseline_test_loss": ev["baseline"]["loss"],
               "test_answer_tokens": ev["challenger"]["tokens"], "final_train_loss": tr["train_loss"],
               "train_runtime_s": tr["runtime_s"], "train_examples": tr["train_examples"],
               "truncated_train_examples": tr["truncated_examples"], "dataset_rows": snap["rows"]}
    if tr["eval_loss"] is not None:
        metrics["final_val_loss"] = tr["eval_loss"]
    for prefix, result in (("", ev["challenger"]), ("baseline_", ev["baseline"])):
        if result.get("decision_accuracy") is not None:
            metrics[f"{prefix}test_decision_accuracy"] = result["decision_accuracy"]
    if ev.get("decision_majority_share") is not None:
        metrics["test_decision_majority_share"] = ev["decision_majority_share"]
    all_tags = {"data_fingerprint": snap["fingerprint"], "data_source": snap["source"], **(tags or {})}
    reg = log_and_register(cfg, run_key, paths.root, tags=all_tags, metrics=metrics,
                           decision=decision, samples=ev["samples"])
    write_json(paths.reports / "registered.json", asdict(reg))
    return asdict(reg)


def _decided(paths: RunPaths) -> tuple[Any, Any]:
    """(Registered, Decision) of this run, as register and evaluate wrote them."""
    from ml.registry import Decision, Registered

    return (Registered(**read_json(paths.reports / "registered.json")),
            Decision(**read_json(paths.reports / "evaluation.json")["decision"]))


def promote(cfg: PipelineConfig, paths: RunPaths) -> dict[str, Any]:
    """Move @champion to this run's version. Only a version its evaluation chose can get it."""
    from ml.registry import promote_version

    registered, decision = _decided(paths)
    if not decision.promote:
        raise RuntimeError(f"version {registered.version} was not chosen for promotion: {decision.reason}")
    promote_version(cfg.registry, registered, decision)
    return {"version": registered.version, "promoted": True, "reason": decision.reason}


def keep(cfg: PipelineConfig, paths: RunPaths) -> dict[str, Any]:
    """Keep the champion: tag this run's version rejected, with the reason."""
    from ml.registry import reject_version

    registered, decision = _decided(paths)
    reject_version(cfg.registry, registered, decision)
    return {"version": registered.version, "promoted": False, "reason": decision.reason}


def run_all(cfg: PipelineConfig, run_key: str) -> dict[str, Any]:
    """Every step in order, without Airflow; the wall time of each comes back as `seconds`."""
    paths = run_paths(cfg, run_key)
    seconds: dict[str, float] = {}

    def timed(name: str, step: Any, *args: Any) -> Any:
        start = time.perf_counter()
        out = step(cfg, paths, *args)
        seconds[name] = round(time.perf_counter() - start, 1)
        log.info("step %s took %.1fs", name, seconds[name])
        return out

    snap = timed("load", load)
    timed("validate", validate)
    timed("prepare", prepare)
    timed("train", train)
    promoted = timed("evaluate", evaluate)["promote"]
    timed("register", register, run_key)
    result = timed("promote" if promoted else "keep", promote if promoted else keep)
    return {"run_dir": str(paths.root), "fingerprint": snap.fingerprint, **result, "seconds": seconds}
