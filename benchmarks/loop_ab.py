"""The reference loop and the project's train step, phase by phase, on ONE loaded model in one process.

    python3 benchmarks/loop_ab.py [--model /tmp/l8b] PHASE [PHASE ...]
    python3 benchmarks/loop_ab.py --backend hf --model state/models/tiny-llama-ko --steps 4 \
        ref seed+model.max_seq_length=8192   (CPU rehearsal: `python -m ml tiny-model --profile demo`
        builds the tiny model; its data-trained tokenizer cuts this text into ~10x more tokens)

At the seed's shape (3 x 512) a step is CPU-bound, and the host's speed moves by up to
50 % between device calls (docs/benchmarks.md), more than the differences worth finding.
Here every phase shares the process, the Unsloth model and the host. Phases:

  ref[+autocast][+nosync][+syncs]
      the loop of ../shared/gpu/anchor_bench.py on full random 512 x 3 batches: forward with
      labels (Unsloth's own loss), backward, torch AdamW, a synchronize around each step;
      +autocast inside torch.autocast(bf16), as accelerate wraps the Trainer's forward;
      +nosync without the per-step synchronize (the host runs ahead, as in the Trainer);
      +syncs counts host<-GPU synchronisations per step by source line
  seed[+OPTION...]
      `ml.train.finetune` with the seed profile in the seed's memory layout (3 x 4, padded to the
      longest row, every layer recomputed) on rows of 512 tokens or more (the
      reference's work; +pubmedqa: PubMedQA-Ko-like rows); options name config overrides
      (`--set`-style, KEY=VALUE) or: syncs (count synchronisations), blocking (inputs copied
      to the GPU with a synchronising copy), noamp (no autocast: Unsloth's own switch,
      UNSLOTH_MIXED_PRECISION=bfloat16, makes its trainer leave accelerate's bf16 autocast off)
      (Its `trlmask` option, the loss through TRL's own boolean-mask forward, answered its
      question in docs/benchmarks.md and went; it is in git history at commit fcba487.)

Prints one RESULT line per phase and writes $OUT/loop_ab.jsonl. The first phase pays the
one-off kernel builds; run a throw-away phase first when that matters.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import statistics
import sys
import tempfile
import time
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

from train_gpu import SEED, SEED_LAYOUT, sync_debug_callback, synthetic_rows  # noqa: E402

SEQ, BATCH = 512, 3


@contextlib.contextmanager
def counting_syncs(report: dict[str, Any], steps: int) -> Iterator[None]:
    """torch's sync debug mode warns at every synchronising CUDA call; count them by source line."""
    import collections
    import warnings

    import torch

    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode(0)
    counts = collections.Counter(f"{w.filename}:{w.lineno}" for w in records if "synchroniz" in str(w.message))
    report["syncs_per_step"] = round(sum(counts.values()) / steps, 1)
    report["sync_sites"] = {k: round(v / steps, 2) for k, v in counts.most_common(15)}


def ref_phase(model: Any, opts: set[str], warm: int = 3, steps: int = 20) -> dict[str, Any]:
    import torch

    cuda = torch.cuda.is_available()
    if cuda:
        from unsloth import FastLanguageModel

        FastLanguageModel.for_training(model)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4)
    g = torch.Generator(device="cpu").manual_seed(0)
    vocab = min(128000, model.config.vocab_size)
    batches = [torch.randint(0, vocab, (BATCH, SEQ), generator=g).to(model.device) for _ in range(4)]
    amp = (torch.autocast(model.device.type, dtype=torch.bfloat16) if "autocast" in opts
           else contextlib.nullcontext())
    sync = torch.cuda.synchronize if cuda else lambda: None
    report: dict[str, Any] = {}

    def step(i: int) -> Any:
        x = batches[i % 4]
        with amp:
            out = model(input_ids=x, labels=x)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out

    for i in range(warm):
        step(i)
    sync()
    times = []
    if "nosync" in opts:
        t = time.perf_counter()
        for i in range(steps):
            step(i)
        sync()
        times = [(time.perf_counter() - t) / steps]
    else:
        for i in range(steps):
            sync()
            t = time.perf_counter()
            step(i)
            sync()
            times.append(time.perf_counter() - t)
    if "syncs" in opts and cuda:
        with counting_syncs(report, 2):
            step(0)
            step(1)
    med = statistics.median(times)
    return {"tokens_per_s": round(BATCH * SEQ / med, 1), "micro_batch_s": round(med, 4),
            "step_s_spread": [round(min(times), 4), round(max(times), 4)], **report}


def seed_phase(loaded: tuple[Any, Any, Any], opts: list[str], work: Path, steps: int,
               model_path: str, backend: str) -> dict[str, Any]:
    import ml.train as mt
    from ml.config import load_config, parse_overrides

    report: dict[str, Any] = {}
    callbacks = [sync_debug_callback(4, 5, report)] if "syncs" in opts else []
    overrides = parse_overrides([o for o in opts if "=" in o])
    max_steps = 6 if "syncs" in opts else steps
    splits = work / ("splits_pubmedqa" if "pubmedqa" in opts else "splits_full")
    cfg = load_config(SEED, {"model.base_model": model_path, "train.backend": backend, **SEED_LAYOUT,
                             "train.max_steps": max_steps, "train.save_steps": 1000,
                             # the one evaluation at the last step, inside training: one after it
                             # would cast the model to bf16 (Unsloth sets bf16_full_eval)
                             "eval.eval_steps": max_steps, "output_dir": str(work), **overrides})
    original_load, original_args = mt.load_for_training, mt.sft_config

    def sft_config(*args: Any, **kwargs: Any) -> Any:
        out = original_args(*args, **kwargs)
        if "blocking" in opts:
            out.accelerator_config.non_blocking = False
        return out

    # The recipe's own seams: the one loaded model instead of a fresh load, and its trainer config.
    mt.load_for_training = lambda cfg, backend: loaded  # type: ignore[assignment]
    mt.sft_config = sft_config  # type: ignore[assignment]
    precision = os.environ.get("UNSLOTH_MIXED_PRECISION")
    if "noamp" in opts:
        os.environ["UNSLOTH_MIXED_PRECISION"] = "bfloat16"
    try:
        out = Path(tempfile.mkdtemp(dir=work))
        result = mt.finetune(cfg, splits, out, callbacks=callbacks)
    finally:
        mt.load_for_training, mt.sft_config = original_load, original_args  # type: ignore[assignment]
        if precision is not None:
            os.environ["UNSLOTH_MIXED_PRECISION"] = precision
    history = json.loads(Path(result.log_history).read_text())
    micro = cfg.train.gradient_accumulation_steps
    return {"tokens_per_s": round(result.tokens_per_s or 0.0, 1), "step_s": round(result.step_s or 0.0, 4),
            "micro_batch_s": round((result.step_s or 0.0) / micro, 4),
            "loss": [round(r["loss"], 4) for r in history if "loss" in r], **report}


def named(function: Any, name: str) -> Any:
    """`function` under another name, so that each phase is its own frame in a py-spy profile."""
    code = function.__code__.replace(co_name=name, co_qualname=name)
    return types.FunctionType(code, function.__globals__, name, function.__defaults__, function.__closure__)


def write_splits(work: Path) -> None:
    from ml.data import QAExample, write_jsonl

    for name, full in (("splits_full", True), ("splits_pubmedqa", False)):
        rows = [QAExample(str(r["key"]), str(r["QUESTION"]), tuple(r["CONTEXTS"]), str(r["LONG_ANSWER"]))  # type: ignore[arg-type]
                for r in synthetic_rows(480, full=full)]
        write_jsonl(rows[:-24], work / name / "train.jsonl")
        write_jsonl(rows[-24:-12], work / name / "validation.jsonl")
        write_jsonl(rows[-12:], work / name / "test.jsonl")


WRAPPERS = ("forward", "_original_forward")  # the forwards accelerate (autocast) and TRL (fused head) install


def forward_attributes(model: Any) -> list[tuple[Any, dict[str, Any]]]:
    """The instance-level attributes that a phase may replace on the model and its decoder layers,
    saved before the first phase and restored after each, so that no phase runs inside another's changes."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    from ml.speed import LAYER_CHECKPOINT_FUNCTION as CHECKPOINT_FUNCTION  # selective checkpointing replaces it

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    return [(o, {k: o.__dict__[k] for k in (*WRAPPERS, CHECKPOINT_FUNCTION) if k in o.__dict__})
            for o in [model, model.base_model, model.get_base_model(), *layers]]


def restore(saved: list[tuple[Any, dict[str, Any]]]) -> None:
    for obj, attrs in saved:
        for key in WRAPPERS:  # wrappers a phase added go; a checkpoint function a trainer set up stays
            obj.__dict__.pop(key, None)
        obj.__dict__.update(attrs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("phases", nargs="+")
    parser.add_argument("--model", default="/tmp/l8b")
    parser.add_argument("--steps", type=int, default=14, help="optimizer steps of each seed phase")
    parser.add_argument("--backend", choices=["unsloth", "hf"], default="unsloth",
                        help="hf: a CPU rehearsal of the phases on a small model")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("ml").setLevel(logging.INFO)

    from ml.backend import pick_backend
    from ml.config import load_config
    from ml.modeling import load_for_training

    pick_backend(args.backend)  # Unsloth first, before the recipe and transformers
    work = Path(tempfile.mkdtemp(prefix="loop-ab-"))
    write_splits(work)
    t = time.perf_counter()
    cfg = load_config(SEED, {"model.base_model": args.model})
    if args.backend == "unsloth":
        loaded = load_for_training(cfg, "unsloth")
    else:  # wrap in LoRA here, as Unsloth does, so that every phase trains the same adapter
        from peft import get_peft_model

        base, tokenizer, peft_config = load_for_training(cfg, "hf")
        loaded = (get_peft_model(base, peft_config), tokenizer, None)
    print(f"model loaded in {time.perf_counter() - t:.1f}s", flush=True)
    model = loaded[0]
    saved = forward_attributes(model)
    lora = next(p for n, p in model.named_parameters() if "lora_A" in n)
    rows = []
    out_file = Path(os.environ.get("OUT", "/tmp")) / "loop_ab.jsonl"
    for i, phase in enumerate(args.phases):
        kind, *opts = phase.split("+")
        t = time.perf_counter()
        frame = f"phase{i:02d}_{kind}"
        res = (named(ref_phase, frame)(model, set(opts)) if kind == "ref"
               else named(seed_phase, frame)(loaded, opts, work, args.steps, args.model, args.backend))
        restore(saved)
        row = {"phase": phase, "order": i, "wall_s": round(time.perf_counter() - t, 1),
               "lora_dtype": str(lora.dtype), **res}
        rows.append(row)
        print("RESULT " + json.dumps(row), flush=True)
        with out_file.open("a") as f:
            f.write(json.dumps(row) + "\n")
    print(f"\n{'phase':44} {'tokens/s':>9} {'s/micro-batch':>14}")
    for row in rows:
        print(f"{row['phase']:44} {row['tokens_per_s']:9.0f} {row['micro_batch_s']:14.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
