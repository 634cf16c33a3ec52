"""The project's own train step on the Llama-3.1-8B architecture, on a GPU: speed and memory.

    python3 benchmarks/train_gpu.py VARIANT [--model /tmp/l8b] [--steps 8] [--set train.KEY=VALUE ...]
                                            [--tag NAME] [--profile 5:8]

The `exaone` variant trains the EXAONE profile on a random EXAONE-3.5-2.4B checkpoint in its
published layout (`benchmarks/make_exaone.py` writes it to /tmp/exaone24), converted on load
as in production; `--steps -1` keeps the profile's 3 epochs.

Runs `ml.train.finetune` (the code the DAG's train task runs) with the seed's or
the default profile's settings on synthetic data whose lengths resemble PubMedQA-Ko under
the Llama-3 tokenizer (an assumption: question ~25 tokens, contexts ~330
(log-normal), answer ~110; about half the rows exceed 512 tokens and are
truncated, as the seed's were), on random weights built by
`../shared/gpu/anchor_bench.py make` (same architecture, a stand-in tokenizer).
One variant per process (Unsloth patches transformers globally).

Prints one 'RESULT {json}' line and writes $OUT/train_<variant>.json with
non-padding tokens/s and median step time after 2 warm-up steps, peak GPU
memory, model FLOPs utilisation against 6N and against 4N FLOPs per token (LoRA over a frozen base
without recompute: forward 2N, input gradients 2N; docs/gpu.md), the activation layout the trainer
chose (`train.uncheckpointed_layers: auto`) with its planned peak, and the loss curve.
`--profile A:B` runs torch.profiler over optimizer steps A..B and adds how busy
the GPU was (kernel time / wall time) and the top kernels and CPU ops;
`--sync-debug A:B` counts the host<-GPU synchronisations per step by source line.
Under torchrun (`python3 -m torch.distributed.run --nproc-per-node N benchmarks/train_gpu.py ...`,
train.num_processes) every process trains its share and rank 0 reports the job: tokens/s of every
process, MFU per GPU, rank 0's peak memory.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PARAMS = {"exaone": 2.41e9}  # parameters in the matmuls of a forward pass; the rest are Llama-3.1-8B's
LLAMA_8B_PARAMS = 8.03e9
PEAK_FLOPS = {"measured_800": 800e12, "spec_989": 989e12}  # H100 dense bf16: measured here / datasheet

SEED, DEFAULT, EXAONE = "pubmedqa-ko-llama31-8b-seed", "pubmedqa-ko-llama31-8b", "exaone-3.5-2.4b"
# the seed's own memory layout: batches padded to their longest row, every layer recomputed
SEED_LAYOUT: dict[str, object] = {"train.pad_to_multiple_of": None, "train.uncheckpointed_layers": 0}

# variant -> (profile, config overrides); --set adds more
VARIANTS: dict[str, tuple[str, dict[str, object]]] = {
    # the seed exactly, in its own memory layout: 3 x 4, random order, padded to the longest row,
    # every layer checkpointed
    "seed_unsloth": (SEED, {"train.backend": "unsloth", **SEED_LAYOUT}),
    # the same through transformers + peft + bitsandbytes 4-bit
    "seed_hf": (SEED, {"train.backend": "hf", **SEED_LAYOUT}),
    # the seed profile as shipped: the seed's batches in the seed's order with the two options
    # that change no example, order or update (batch lengths in steps of 64; no recompute)
    "seed_unsloth_lean": (SEED, {"train.backend": "unsloth"}),
    # ... and length-grouped batches, as the default (same examples per step, another order)
    "seed_unsloth_fast": (SEED, {"train.backend": "unsloth", "train.group_by_length": True}),
    # the shipped default profile as it is (12 x 1, length-grouped, padded to multiples of
    # 64, as many layers uncheckpointed as the card holds: `auto`), on Unsloth
    "default": (DEFAULT, {"train.backend": "unsloth"}),
    # ... with the layout shipped before issue 31: the last 12 layers uncheckpointed
    "default_fixed12": (DEFAULT, {"train.backend": "unsloth", "train.uncheckpointed_layers": 12}),
    # ... with Unsloth's padding-free batching instead of padding
    "default_padfree": (DEFAULT, {"train.backend": "unsloth", "train.padding_free": True}),
    # the EXAONE profile as it is (batch 1, lr 1e-5, AdamW, 10 % warm-up, bf16 LoRA)
    "exaone": (EXAONE, {}),
}


def synthetic_rows(n: int, seed: int = 0, full: bool = False) -> list[dict[str, object]]:
    """PubMedQA-Ko-like lengths; `full`: every row longer than 512 tokens (the reference's full batches)."""
    import numpy as np

    rng = np.random.default_rng(seed)

    def words(k: int) -> str:
        return " ".join(f"t{w}" for w in rng.integers(0, 128000, size=int(k)))

    rows = []
    for i in range(n):
        q = np.clip(rng.normal(25, 8), 8, 60)
        ctx = 300 if full else np.clip(rng.lognormal(np.log(330), 0.35), 80, 900)
        ans = 300 if full else np.clip(rng.normal(110, 35), 30, 260)
        rows.append({"key": f"r{i}", "QUESTION": words(q), "CONTEXTS": [words(ctx)], "LONG_ANSWER": words(ans)})
    return rows


def kernel_us(events: object) -> float:
    """Microseconds of GPU kernels and copies (the profiler table's "Self CUDA time total")."""
    from torch.autograd import DeviceType

    return float(sum(e.self_device_time_total for e in events  # type: ignore[attr-defined]
                     if e.device_type == DeviceType.CUDA and not e.is_user_annotation))


def print_top_ops(events: object) -> None:
    for key in ("self_device_time_total", "self_cpu_time_total"):
        print(events.table(sort_by=key, row_limit=25, max_name_column_width=70))  # type: ignore[attr-defined]


def profiler_callback(first: int, last: int, report: dict[str, object]) -> object:
    """Profiles optimizer steps first..last; fills `report` with GPU busy share and top ops."""
    import time

    import torch
    from torch.profiler import ProfilerActivity, profile
    from transformers import TrainerCallback

    class Profile(TrainerCallback):  # type: ignore[misc]
        prof: object = None
        t0 = 0.0

        def on_step_begin(self, args, state, control, **kw):  # type: ignore[no-untyped-def]
            if state.global_step + 1 == first:
                torch.cuda.synchronize()
                self.prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=False)
                self.prof.__enter__()  # type: ignore[attr-defined]
                self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):  # type: ignore[no-untyped-def]
            if state.global_step == last and self.prof is not None:
                torch.cuda.synchronize()
                wall = time.perf_counter() - self.t0
                self.prof.__exit__(None, None, None)  # type: ignore[attr-defined]
                events = self.prof.key_averages()  # type: ignore[attr-defined]
                gpu_us = kernel_us(events)
                report["profile_steps"] = f"{first}..{last}"
                report["profile_wall_s"] = round(wall, 3)
                report["profile_gpu_kernel_s"] = round(gpu_us / 1e6, 3)
                report["profile_gpu_busy"] = round(gpu_us / 1e6 / wall, 3)
                print_top_ops(events)

    return Profile()


def train_mode_once_callback() -> object:
    """Experiment: the Trainer calls model.train() before every micro-batch, and Unsloth's
    train() walks every module; make a call that changes nothing return at once."""
    from transformers import TrainerCallback

    class TrainModeOnce(TrainerCallback):  # type: ignore[misc]
        def on_train_begin(self, args, state, control, model=None, **kw):  # type: ignore[no-untyped-def]
            original = model.train

            def train(mode: bool = True):  # type: ignore[no-untyped-def]
                return model if model.training == mode else original(mode)

            model.train = train

    return TrainModeOnce()


def gc_timer_callback() -> object:
    """Seconds the garbage collector ran between train begin and end, by generation (a
    gen-2 pass walks every object the imports and the model created)."""
    import gc
    import time

    from transformers import TrainerCallback

    class GCTimer(TrainerCallback):  # type: ignore[misc]
        def __init__(self) -> None:
            self.seconds = [0.0, 0.0, 0.0]
            self.count = [0, 0, 0]
            self.start = 0.0

        def __call__(self, phase: str, info: dict[str, int]) -> None:
            if phase == "start":
                self.start = time.perf_counter()
            else:
                self.seconds[info["generation"]] += time.perf_counter() - self.start
                self.count[info["generation"]] += 1

        def on_train_begin(self, args, state, control, **kw):  # type: ignore[no-untyped-def]
            gc.callbacks.append(self)

        def on_train_end(self, args, state, control, **kw):  # type: ignore[no-untyped-def]
            gc.callbacks.remove(self)

    return GCTimer()


def sync_debug_callback(first: int, last: int, report: dict[str, object]) -> object:
    """Lists where the loop makes the host wait for the GPU during optimizer steps first..last:
    torch's sync debug mode warns at every synchronizing CUDA call; the warnings are counted
    by the Python line that made them."""
    import collections
    import warnings

    import torch
    from transformers import TrainerCallback

    class SyncDebug(TrainerCallback):  # type: ignore[misc]
        def __init__(self) -> None:
            self.counts: collections.Counter[str] = collections.Counter()
            self.caught: object = None

        def on_step_begin(self, args, state, control, **kw):  # type: ignore[no-untyped-def]
            if state.global_step + 1 == first:
                self.caught = warnings.catch_warnings(record=True)
                self.records = self.caught.__enter__()  # type: ignore[attr-defined]
                warnings.simplefilter("always")
                if torch.cuda.is_available():  # no device, nothing to wait for
                    torch.cuda.set_sync_debug_mode("warn")

        def on_step_end(self, args, state, control, **kw):  # type: ignore[no-untyped-def]
            if state.global_step == last and self.caught is not None:
                if torch.cuda.is_available():
                    torch.cuda.set_sync_debug_mode(0)
                self.caught.__exit__(None, None, None)  # type: ignore[attr-defined]
                for w in self.records:
                    if "synchronizing" in str(w.message):
                        self.counts[f"{w.filename}:{w.lineno}"] += 1
                steps = last - first + 1
                report["syncs_per_step"] = round(sum(self.counts.values()) / steps, 1)
                report["sync_sites"] = {k: round(v / steps, 2) for k, v in self.counts.most_common(20)}

    return SyncDebug()


def gc_freeze_callback() -> object:
    """Experiment: move every object alive at train begin (imports, model) out of the collector's reach."""
    from transformers import TrainerCallback

    class Freeze(TrainerCallback):  # type: ignore[misc]
        def on_train_begin(self, args, state, control, **kw):  # type: ignore[no-untyped-def]
            import gc

            gc.collect()
            gc.freeze()
            print(f"gc.freeze: {gc.get_freeze_count()} objects frozen", flush=True)

    return Freeze()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("variant", choices=sorted(VARIANTS))
    parser.add_argument("--model", default="/tmp/l8b")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rows", type=int, default=480)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="extra config override on top of the variant (repeatable)")
    parser.add_argument("--tag", help="name of this row in the output (default: the variant)")
    parser.add_argument("--profile", metavar="A:B", help="profile optimizer steps A..B")
    parser.add_argument("--train-mode-once", action="store_true",
                        help="experiment: skip the Trainer's per-micro-batch model.train() when already training")
    parser.add_argument("--sync-debug", metavar="A:B",
                        help="count host<-GPU synchronisations by source line over optimizer steps A..B")
    parser.add_argument("--gc-freeze", action="store_true",
                        help="experiment: gc.freeze() at train begin")
    parser.add_argument("--lengths", choices=["pubmedqa", "full"], default="pubmedqa",
                        help="row lengths: PubMedQA-Ko-like, or all over 512 tokens (no padding at all)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    tag = args.tag or args.variant

    from ml.backend import pick_backend, train_here
    from ml.config import load_config, parse_overrides
    from ml.data import QAExample, write_jsonl

    extra = parse_overrides(args.set)  # before any work: a malformed --set fails at once

    work = Path(tempfile.mkdtemp(prefix="train-gpu-"))
    examples = [QAExample(str(r["key"]), str(r["QUESTION"]), tuple(r["CONTEXTS"]), str(r["LONG_ANSWER"]))  # type: ignore[arg-type]
                for r in synthetic_rows(args.rows, full=args.lengths == "full")]
    write_jsonl(examples[:-24], work / "splits" / "train.jsonl")
    write_jsonl(examples[-24:-12], work / "splits" / "validation.jsonl")
    write_jsonl(examples[-12:], work / "splits" / "test.jsonl")
    overrides = {"model.base_model": args.model, "train.max_steps": args.steps, "train.save_steps": 1000,
                 "eval.eval_steps": 1000, "output_dir": str(work), **VARIANTS[args.variant][1], **extra}
    cfg = load_config(VARIANTS[args.variant][0], overrides)
    pick_backend(cfg.train.backend)  # Unsloth before transformers, which the callbacks below import
    import time

    from ml.base_models import resolve

    t0 = time.perf_counter()
    resolve(args.model)  # an EXAONE checkpoint is converted here, once; training loads the result
    convert_s = time.perf_counter() - t0
    report: dict[str, object] = {}
    callbacks = [profiler_callback(*map(int, args.profile.split(":")), report)] if args.profile else []
    if args.train_mode_once:
        callbacks.append(train_mode_once_callback())
    if args.gc_freeze:
        callbacks.append(gc_freeze_callback())
    if args.sync_debug:
        callbacks.append(sync_debug_callback(*map(int, args.sync_debug.split(":")), report))
    gc_timer = gc_timer_callback()
    callbacks.append(gc_timer)
    result = train_here(cfg, work / "splits", work / "out", callbacks=callbacks)
    from ml import distributed

    if not distributed.is_main():  # one of several processes: rank 0 reports the job
        return 0
    history = json.loads(Path(result.log_history).read_text())
    tps = result.tokens_per_s or 0.0
    params = PARAMS.get(args.variant, LLAMA_8B_PARAMS)
    import torch

    from ml.speed import resolve_loss_head

    res = {
        "variant": tag, "profile": VARIANTS[args.variant][0], "overrides": extra, "lengths": args.lengths,
        "train_mode_once": args.train_mode_once, "gc_freeze": args.gc_freeze,
        "gc_s_by_generation": [round(x, 2) for x in gc_timer.seconds],  # type: ignore[attr-defined]
        "gc_collections": gc_timer.count,  # type: ignore[attr-defined]
        "backend": result.backend,
        "loss_head": resolve_loss_head(cfg.train.loss_head, torch.cuda.is_available(), result.num_processes),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "batch": cfg.train.per_device_train_batch_size, "accum": cfg.train.gradient_accumulation_steps,
        "processes": result.num_processes, "per_device_batch": result.per_device_batch,
        "accumulation": result.accumulation,
        "padding_free": cfg.train.padding_free, "group_by_length": cfg.train.group_by_length,
        "steps": result.global_step, "real_tokens_per_s": round(tps, 1),
        "step_s_median": round(result.step_s or 0.0, 3), "peak_gib": round(result.peak_gpu_gib or 0.0, 2),
        "epochs": cfg.train.num_train_epochs if cfg.train.max_steps < 0 else None,
        "runtime_s": round(result.runtime_s, 1),
        "convert_s": round(convert_s, 1), "params": params,
        # per GPU: the job's tokens/s over every process's card
        **{f"mfu_{k}": round(tps * 6 * params / (v * result.num_processes), 3) for k, v in PEAK_FLOPS.items()},
        **{f"mfu4n_{k}": round(tps * 4 * params / (v * result.num_processes), 3) for k, v in PEAK_FLOPS.items()},
        "truncated_train_examples": result.truncated_examples, "train_examples": result.train_examples,
        "gradient_checkpointing": cfg.train.gradient_checkpointing,
        "uncheckpointed_layers_setting": cfg.train.uncheckpointed_layers,
        "uncheckpointed_layers": result.uncheckpointed_layers, "planned_peak_gib": result.planned_peak_gib,
        "gpu_memory_fraction": cfg.train.gpu_memory_fraction,
        # batches whose rows all lost their answer to truncation: zero loss, zero gradient, yet a step
        "steps_without_answer_tokens": sum(1 for r in history if r.get("loss") == 0 and r.get("grad_norm") == 0),
        "loss": [round(r["loss"], 4) for r in history if "loss" in r], **report,
    }
    print("RESULT " + json.dumps(res), flush=True)
    out = Path(os.environ.get("OUT", "/tmp"))
    (out / f"train_{tag}.json").write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
