"""Wall time of each step of the whole pipeline (`python -m ml pipeline`), against a local MLflow store.

    python3 benchmarks/pipeline_stages.py --profile pubmedqa-ko-llama31-8b-seed --model /tmp/l8b
        [--data FILE | --rows 500] [--set KEY=VALUE ...] [--tag NAME]

On the GPU machine: the seed profile on the Llama-3.1-8B architecture (random weights from
`../shared/gpu/anchor_bench.py make`, its stand-in tokenizer), on synthetic rows with
PubMedQA-Ko-like lengths (benchmarks/train_gpu.py's, the seed dataset's 500) unless --data names
a file. Every step runs as `run_all` runs it: training in a child process, evaluation, the MLflow
run, the registered version and the alias. Prints one 'RESULT {json}' line: seconds per step and
the share of the wall time that is not training. CPU rehearsal:
`python benchmarks/pipeline_stages.py --profile demo --model state/models/tiny-llama-ko
--data data/sample/pubmedqa_ko_sample.jsonl --set train.max_steps=4`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
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
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    work = Path(tempfile.mkdtemp(prefix="pipeline-stages-"))
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
    from ml import pipeline
    from ml.config import load_config, parse_overrides

    overrides = {"model.base_model": args.model, "output_dir": str(work / "runs"),
                 "registry.artifact_location": str(work / "mlartifacts")}
    if args.data:
        overrides["data.source"] = str(Path(args.data).resolve())
    else:  # synthetic "t123" words: no script, and about half the rows longer than 512 tokens, as the seed's
        from train_gpu import synthetic_rows

        rows = work / "rows.jsonl"
        rows.write_text("".join(json.dumps(r) + "\n" for r in synthetic_rows(args.rows)))
        overrides.update({"data.source": str(rows), "data.id_column": "key", "validation.script": None,
                          "validation.max_truncated_share": 1.0})
    cfg = load_config(args.profile, {**overrides, **parse_overrides(args.set)})
    start = time.perf_counter()
    result = pipeline.run_all(cfg, args.tag)
    total = time.perf_counter() - start
    seconds = result["seconds"]
    report = {"tag": args.tag, "profile": args.profile, "model": args.model, "overrides": args.set,
              "seconds": seconds, "total_s": round(total, 1),
              "not_training_share": round(1 - seconds["train"] / total, 3), "version": result["version"],
              "promoted": result["promoted"]}
    print("RESULT " + json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
