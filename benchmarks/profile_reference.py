"""Profile ../shared/gpu/anchor_bench.py's Unsloth loop (the reference row) the way
`train_gpu.py --profile` profiles the project's step, to see where the two differ.

    python3 benchmarks/profile_reference.py [unsloth|hf]     (anchor_bench.py in .gpu-bundle/)

Profiles reference steps 5..7 (after warm-up); prints GPU kernel time per step
against wall time per step, and the top kernels and CPU ops.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, schedule

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / ".gpu-bundle")]
import anchor_bench  # noqa: E402
from train_gpu import kernel_us, print_top_ops  # noqa: E402

WAIT, WARMUP, ACTIVE = 4, 1, 3


def main() -> None:
    prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA],
                   schedule=schedule(wait=WAIT, warmup=WARMUP, active=ACTIVE, repeat=1))
    marks: list[float] = []
    original = torch.optim.AdamW.step

    def step(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        out = original(self, *args, **kwargs)
        torch.cuda.synchronize()
        marks.append(time.perf_counter())
        prof.step()
        return out

    torch.optim.AdamW.step = step  # type: ignore[method-assign]
    anchor_bench.STEPS = WAIT + WARMUP + ACTIVE + 1 - anchor_bench.WARM
    prof.__enter__()
    {"unsloth": anchor_bench.unsloth, "hf": anchor_bench.hf}[sys.argv[1] if len(sys.argv) > 1 else "unsloth"]()
    prof.__exit__(None, None, None)
    events = prof.key_averages()
    gpu_s = kernel_us(events) / 1e6
    wall = marks[WAIT + WARMUP + ACTIVE - 1] - marks[WAIT + WARMUP - 1]
    print(f"PROFILE reference steps {WAIT + WARMUP + 1}..{WAIT + WARMUP + ACTIVE}: wall {wall / ACTIVE:.3f} s/step, "
          f"GPU kernels {gpu_s / ACTIVE:.3f} s/step, busy {gpu_s / wall:.2f}")
    print_top_ops(events)


if __name__ == "__main__":
    main()
