"""Wall time of each step of the whole pipeline (`python -m ml pipeline`), against a local MLflow store.

    python3 benchmarks/pipeline_stages.py --profile pubmedqa-ko-llama31-8b-seed --model /tmp/l8b
        [--data FILE | --rows 500] [--set KEY=VALUE ...] [--tag NAME] [--runs N [--then-set KEY=VALUE ...]]
        [--work DIR] [--promote-first]

On the GPU machine: the seed profile on the Llama-3.1-8B architecture (random weights from
`../shared/gpu/anchor_bench.py make`, its stand-in tokenizer), on synthetic rows with
PubMedQA-Ko-like lengths (benchmarks/train_gpu.py's, the seed dataset's 500) unless --data names
a file. Each run is `python -m ml pipeline` in a process of its own (imports included, as a scheduled
run pays them): training in a child process, evaluation, the MLflow run, the registered version and
the alias, against a local MLflow store created before the clock starts. With --runs 2 the second
run (forced when its data and config are the first's; --then-set changes its config) competes with
the first one's champion.
Prints one 'RESULT {json}' line per run: seconds per step, and the share of the wall time that is
not training: everything but the trainer's process, and in it the test split scored after training
(`eval.score_while_loaded`). CPU rehearsal:
`python benchmarks/pipeline_stages.py --profile demo --model state/models/tiny-llama-ko
--data data/sample/pubmedqa_ko_sample.jsonl --set train.max_steps=4`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", required=True)
    parser.add_argument("--model", required=True, help="base model folder")
    parser.add_argument("--data", help="dataset file (default: synthetic PubMedQA-Ko-like rows)")
    parser.add_argument("--rows", type=int, default=500, help="synthetic rows (without --data)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--tag", default="pipeline")
    parser.add_argument("--runs", type=int, default=1, help="pipeline runs one after another (2nd on: vs the champion)")
    parser.add_argument("--then-set", action="append", default=[], metavar="KEY=VALUE",
                        help="overrides of the runs after the first")
    parser.add_argument("--work", help="folder of the runs and the MLflow store (default: a new temp folder)")
    parser.add_argument("--promote-first", action="store_true",
                        help="promote the first run's version by hand (python -m ml promote) if its evaluation kept "
                             "it, so that the next run meets a champion")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="pipeline-stages-"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
    from mlflow import MlflowClient

    from ml.config import load_config, parse_overrides
    from ml.runs import RunPaths, read_json

    overrides = {"model.base_model": args.model, "output_dir": str(work / "runs"),
                 "registry.artifact_location": str(work / "mlartifacts")}
    if args.data:
        overrides["data.source"] = str(Path(args.data).resolve())
    else:  # synthetic "t123" words: no script, and about half the rows longer than 512 tokens, as the seed's
        from train_gpu import synthetic_rows

        rows = work / "rows.jsonl"
        rows.write_text("".join(json.dumps(r) + "\n" for r in synthetic_rows(args.rows)))
        overrides.update({"data.source": str(rows), "data.id_column": "key", "data.decision_column": None,
                          "validation.script": None,
                          "validation.max_truncated_share": 1.0})
    cfg = load_config(args.profile, {**overrides, **parse_overrides(args.set)})
    later = load_config(args.profile, {**overrides, **parse_overrides(args.set + args.then_set)})
    MlflowClient().search_experiments()  # the store exists before the clock starts, as a tracking server does
    for run in range(1, args.runs + 1):  # run 1 against the base model, later runs against the champion
        config = work / f"config-{run}.json"
        config.write_text((cfg if run == 1 else later).model_dump_json())
        cmd = [sys.executable, "-m", "ml", "pipeline", "--config", str(config), "--run-key", f"{args.tag}-{run}"]
        start = time.perf_counter()  # a process of its own, as each scheduled run: imports included
        out = subprocess.run(cmd + ["--force"] * (run > 1), cwd=HERE.parent, stdout=subprocess.PIPE, text=True,
                             check=True)
        total = time.perf_counter() - start
        result = json.loads(out.stdout)
        seconds = result["seconds"]
        paths = RunPaths(Path(result["run_dir"]))
        scores, trained = read_json(paths.scores), read_json(paths.trained.result)
        # Training: the trainer's process, from its start to its end (its imports and model load included),
        # less the test split it scored after training (eval.score_while_loaded). The rest of the train step
        # (the champion fetched, the MLflow run opened) is not training.
        scoring = scores["seconds"] if scores["scored_in"] == "training process" else 0.0
        training = seconds.get("train process", seconds["train"]) - scoring
        report = {"tag": args.tag, "run": run, "profile": args.profile, "model": args.model,
                  "overrides": args.set + (args.then_set if run > 1 else []),
                  "seconds": seconds, "total_s": round(total, 1), "trainer_runtime_s": round(trained["runtime_s"], 1),
                  "scoring_in_trainer_s": scoring, "scored_in": scores["scored_in"],
                  "compared_with": scores["baseline_name"], "training_s": round(training, 1),
                  "not_training_share": round(1 - training / total, 3), "version": result["version"],
                  "promoted": result["promoted"], "test_loss": scores["challenger"]["loss"],
                  "baseline_test_loss": scores["baseline"]["loss"],
                  "decision_accuracy": [scores[k].get("decision_accuracy") for k in ("challenger", "baseline")],
                  "test_rows": scores["challenger"]["examples"], "tokens_per_s": trained.get("tokens_per_s"),
                  "peak_gpu_gib": trained.get("peak_gpu_gib")}
        print("RESULT " + json.dumps(report), flush=True)
        if run == 1 and args.promote_first and not result["promoted"]:
            subprocess.run([sys.executable, "-m", "ml", "promote", "--config", str(config), "--version",
                            str(result["version"]), "--reason", "benchmark: the next run meets a champion"],
                           cwd=HERE.parent, check=True, stdout=subprocess.DEVNULL)
    return 0


if __name__ == "__main__":
    sys.exit(main())
