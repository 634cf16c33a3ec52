"""Data-parallel training: N processes, each with a copy of the model and a share of every optimizer
step's examples, their gradients averaged before each update (the transformers Trainer's DDP).

`train.num_processes` says how many; the train step starts them with PyTorch's launcher (torchrun,
`launch_command`), and each process learns its place from torchrun's environment (`world_size`,
`rank`, `is_main`). The configured examples per optimizer step are the unit: `split_batch` divides
them over the processes, so that N processes train the update sequence one process trains. Only
the main process (rank 0) writes the trainer's files.

torch is imported inside the functions that need it: the supervising task uses the rest.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass

from ml.errors import ConfigError

# Each worker's output line starts with its rank (torchrun's prefix of a teed line).
LINE_PREFIX = "[rank${rank}] "


def world_size() -> int:
    """How many processes train together (1 outside torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    """This process's GPU on its machine."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """The process that writes the trainer's files (rank 0), and the only one outside torchrun."""
    return rank() == 0


@dataclass(frozen=True)
class BatchSplit:
    """The configured examples per optimizer step, shared by `processes` processes."""
    processes: int
    per_device_batch: int  # examples per micro-batch of one process
    accumulation: int  # micro-batches per optimizer step of one process

    @property
    def examples_per_step(self) -> int:
        return self.processes * self.per_device_batch * self.accumulation

    def describe(self) -> str:
        return (f"{self.per_device_batch} per micro-batch x {self.accumulation} accumulation x {self.processes} "
                f"process{'es' if self.processes > 1 else ''} = {self.examples_per_step} examples per optimizer step")


def split_batch(per_device: int, accumulation: int, processes: int) -> BatchSplit:
    """Share `per_device` x `accumulation` examples per optimizer step (the single-process run's) among
    `processes`: the accumulation steps are divided first (each process keeps the configured micro-batch,
    which fits its GPU), what is left of the process count divides the micro-batch. Refused (ConfigError)
    when the examples per step cannot be divided evenly."""
    if processes < 1:
        raise ConfigError(f"train.num_processes must be at least 1, not {processes}")
    shared = math.gcd(accumulation, processes)  # as much of the division as the accumulation takes
    rest = processes // shared
    if per_device % rest:
        raise ConfigError(
            f"train.num_processes={processes} cannot share the {per_device * accumulation} examples per optimizer "
            f"step (train.per_device_train_batch_size={per_device} x train.gradient_accumulation_steps="
            f"{accumulation}) evenly: choose a process count that divides them, or batch settings whose product it "
            "divides")
    return BatchSplit(processes, per_device // rest, accumulation // shared)


def rank_batches(order: Sequence[int], split: BatchSplit, rank: int) -> list[list[int]]:
    """This process's micro-batches of one epoch: `order` (the epoch's example order, the same in every
    process) cut into optimizer steps of `split.examples_per_step` examples, each step's examples dealt
    to the processes as one process would batch them. A full step is cut into micro-batches of
    `per_device_batch` in order, micro-batch s going to process s % N (as accelerate shards batches):
    with one process, the plain batching of the order. The epoch's last, shorter step is cut into as
    few micro-batches per process as hold it, of even sizes. Every process gets as many micro-batches
    of a step as the others: where the examples run out (fewer than micro-batches), a micro-batch is
    empty, and trains nothing (ml.speed.HostCollator makes it a row without a labelled token)."""
    n, per_step, batches = split.processes, split.examples_per_step, []
    for start in range(0, len(order), per_step):
        rows = list(order[start:start + per_step])
        slots = n * (split.accumulation if len(rows) == per_step
                     else math.ceil(len(rows) / (n * split.per_device_batch)))
        size, longer = divmod(len(rows), slots)  # the first `longer` slots take one more
        edges = [s * size + min(s, longer) for s in range(slots + 1)]
        batches += [rows[edges[s]:edges[s + 1]] for s in range(rank, slots, n)]
    return batches


def resolve_processes(requested: int | str, gpus: int) -> int:
    """`train.num_processes` for a machine with `gpus` GPUs: `auto` is one per GPU (1 without one); a
    number is used as given (on the CPU too: gloo), but never more than the GPUs there are."""
    if requested == "auto":
        return max(gpus, 1)
    count = int(requested)
    if gpus and count > gpus:
        raise ConfigError(f"train.num_processes={count} needs {count} GPUs, and this worker sees {gpus}: lower it, or "
                          "set it to auto (one process per GPU)")
    return count


def visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def launch_command(processes: int, log_dir: str) -> list[str]:
    """What starts `processes` trainers (arguments after the Python interpreter, before `-m ml train`):
    torchrun on this machine, no restart (a failure ends the task; its retry resumes from the last
    checkpoint), each worker's output teed to the console, prefixed with its rank, and to `log_dir`.
    Nothing for one process: it is the trainer itself."""
    if processes == 1:
        return []
    return ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes), "--max-restarts", "0",
            "--tee", "3", "--log-dir", log_dir]


def launch_env() -> dict[str, str]:
    """torchrun reads its line prefix from the environment only."""
    return {"TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE": LINE_PREFIX}


@dataclass(frozen=True)
class Failure:
    """The first process that failed, as torchrun's summary names it."""
    rank: int
    exitcode: int
    error: str  # the last line of its traceback, or the signal that ended it

    def describe(self, processes: int) -> str:
        how = f"was killed by signal {-self.exitcode}" if self.exitcode < 0 else f"exited with code {self.exitcode}"
        return f"training process rank {self.rank} of {processes} {how}: {self.error}"


_FIELD = re.compile(r"^\s*(rank|exitcode|traceback)\s*:\s?(.*)$")


def root_cause(lines: Sequence[str]) -> Failure | None:
    """The "Root Cause (first observed failure)" of torchrun's failure summary in `lines`, if any.
    Its traceback is the worker's own (the `ml train` entry is decorated with torchrun's `record`); a
    worker without one (killed by a signal, or an exit code of its own) has torchrun's one line."""
    start = max((i for i, line in enumerate(lines) if "Root Cause (first observed failure)" in line), default=None)
    if start is None:
        return None
    fields: dict[str, str] = {}
    trace: list[str] = []
    for line in lines[start + 1:]:
        if line.startswith("====="):
            break
        found = _FIELD.match(line)
        if found and found[1] not in fields:
            fields[found[1]] = found[2]
            if found[1] == "traceback":
                trace.append(found[2])
        elif "traceback" in fields:
            trace.append(line)
    who = re.match(r"\s*(\d+)", fields.get("rank", ""))
    code = re.match(r"\s*(-?\d+)", fields.get("exitcode", ""))
    if who is None or code is None:
        return None
    error = next((t.strip() for t in reversed(trace) if t.strip()), "no traceback")
    return Failure(int(who[1]), int(code[1]), error)


def use_own_device() -> None:
    """Each process of several trains on a device of its own, made current before anything is placed: its
    GPU, or the CPU, named plain `cpu` (accelerate would name it `cpu:0`, to which torch.load cannot map
    a checkpoint's optimizer state when several processes resume)."""
    import torch

    if world_size() == 1:
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank())
    else:
        os.environ.setdefault("ACCELERATE_TORCH_DEVICE", "cpu")


def quiet_other_ranks() -> None:
    """The processes other than rank 0 log warnings and errors only: rank 0 tells the story once."""
    if not is_main():
        logging.getLogger().setLevel(logging.WARNING)


def sum_over_processes(value: float) -> float:
    """`value` summed over every process (each must call it; an all-reduce). `value` itself in one process."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    total = torch.tensor(float(value), dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return float(total.item())
