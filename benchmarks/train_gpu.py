"""The project's own train step on the Llama-3.1-8B architecture, on a GPU: speed and memory.

    python3 benchmarks/train_gpu.py VARIANT [--model /tmp/l8b] [--steps 8]

Runs `ml.train.train` (the code the DAG's train task runs) with the seed
profile's settings on synthetic data whose lengths resemble PubMedQA-Ko under
the Llama-3 tokenizer (an assumption: question ~25 tokens, contexts ~330
(log-normal), answer ~110; about half the rows exceed 512 tokens and are
truncated, as the seed's were), on random weights built by
`../shared/gpu/anchor_bench.py make` (same architecture, a stand-in tokenizer).
One variant per process (Unsloth patches transformers globally).

Prints one 'RESULT {json}' line and writes $OUT/train_<variant>.json with
non-padding tokens/s and median step time after 2 warm-up steps, peak GPU
memory, model FLOPs utilisation (6 x 8.03e9 FLOPs per token) and the loss curve.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PARAMS = 8.03e9
PEAK_FLOPS = {"measured_800": 800e12, "spec_989": 989e12}  # H100 dense bf16: measured here / datasheet

# variant -> config overrides on top of the seed profile (pubmedqa-ko-llama31-8b)
VARIANTS: dict[str, dict[str, object]] = {
    # the seed's shape with length-grouped batches (less padding, same examples per step)
    "seed_unsloth_grouped": {"train.backend": "unsloth", "train.padding_free": False,
                             "train.per_device_train_batch_size": 3, "train.gradient_accumulation_steps": 4,
                             "train.group_by_length": True},
    # the seed exactly: 3 x 4, padded batches (padding-free off), Unsloth 4-bit
    "seed_unsloth": {"train.backend": "unsloth", "train.padding_free": False,
                     "train.per_device_train_batch_size": 3, "train.gradient_accumulation_steps": 4,
                     "train.group_by_length": False},
    # transformers + peft + bitsandbytes 4-bit at the seed's shape
    "seed_hf": {"train.backend": "hf", "train.per_device_train_batch_size": 3,
                "train.gradient_accumulation_steps": 4, "train.group_by_length": False},
    # the same 12 examples per optimizer step in one micro-batch, batches of similar lengths
    "fast_unsloth": {"train.backend": "unsloth", "train.per_device_train_batch_size": 12,
                     "train.gradient_accumulation_steps": 1, "train.group_by_length": True,
                     "train.padding_free": False},
    # ... and no pad tokens at all (Unsloth's padding-free batching)
    "fast_unsloth_padfree": {"train.backend": "unsloth", "train.per_device_train_batch_size": 12,
                             "train.gradient_accumulation_steps": 1, "train.padding_free": True},
    # the shipped default profile as it is (12 x 1, length-grouped, Unsloth on CUDA)
    "default": {"train.backend": "unsloth"},
}


def synthetic_rows(n: int, seed: int = 0) -> list[dict[str, object]]:
    import numpy as np

    rng = np.random.default_rng(seed)

    def words(k: int) -> str:
        return " ".join(f"t{w}" for w in rng.integers(0, 128000, size=int(k)))

    rows = []
    for i in range(n):
        q = np.clip(rng.normal(25, 8), 8, 60)
        ctx = np.clip(rng.lognormal(np.log(330), 0.35), 80, 900)
        ans = np.clip(rng.normal(110, 35), 30, 260)
        rows.append({"key": f"r{i}", "QUESTION": words(q), "CONTEXTS": [words(ctx)], "LONG_ANSWER": words(ans)})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("variant", choices=sorted(VARIANTS))
    parser.add_argument("--model", default="/tmp/l8b")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rows", type=int, default=480)
    args = parser.parse_args()

    from ml.config import load_config
    from ml.data import QAExample, write_jsonl
    from ml.train import train

    work = Path(tempfile.mkdtemp(prefix="train-gpu-"))
    examples = [QAExample(str(r["key"]), str(r["QUESTION"]), tuple(r["CONTEXTS"]), str(r["LONG_ANSWER"]))  # type: ignore[arg-type]
                for r in synthetic_rows(args.rows)]
    write_jsonl(examples[:-24], work / "splits" / "train.jsonl")
    write_jsonl(examples[-24:-12], work / "splits" / "validation.jsonl")
    write_jsonl(examples[-12:], work / "splits" / "test.jsonl")
    overrides = {"model.base_model": args.model, "train.max_steps": args.steps, "train.save_steps": 1000,
                 "eval.eval_steps": 1000, "output_dir": str(work), **VARIANTS[args.variant]}
    cfg = load_config("pubmedqa-ko-llama31-8b", overrides)
    result = train(cfg, work / "splits", work / "out")
    history = json.loads(Path(result.log_history).read_text())
    tps = result.tokens_per_s or 0.0
    import torch

    res = {
        "variant": args.variant, "backend": result.backend,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "batch": cfg.train.per_device_train_batch_size, "accum": cfg.train.gradient_accumulation_steps,
        "padding_free": cfg.train.padding_free, "group_by_length": cfg.train.group_by_length,
        "steps": result.global_step, "real_tokens_per_s": round(tps, 1),
        "step_s_median": round(result.step_s or 0.0, 3), "peak_gib": round(result.peak_gpu_gib or 0.0, 2),
        **{f"mfu_{k}": round(tps * 6 * PARAMS / v, 3) for k, v in PEAK_FLOPS.items()},
        "truncated_train_examples": result.truncated_examples, "train_examples": result.train_examples,
        "loss": [round(r["loss"], 4) for r in history if "loss" in r],
    }
    print("RESULT " + json.dumps(res), flush=True)
    out = Path(os.environ.get("OUT", "/tmp"))
    (out / f"train_{args.variant}.json").write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
