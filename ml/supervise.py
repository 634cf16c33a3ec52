"""Run a program under supervision: its output streamed line by line, a time limit, and a stop that
reaches its whole process group (SIGTERM, then SIGKILL after a grace period), with the output's
last lines kept for the error message.

The train step starts the trainer through it, so that the trainer owns the GPU: when it ends, CUDA
memory goes back to the worker, and a crash or an OOM fails the task instead of the worker. The
program gets a process group of its own, so that what it starts is stopped with it; a process it
started in a session of its own (torchrun starts each worker so) is found in /proc and stopped too.
This module imports nothing of `ml`.
"""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Finished:
    returncode: int  # negative: killed by that signal
    expired: bool  # stopped at its time limit
    tail: list[str]  # its last lines of output
    seconds: float


def run(cmd: Sequence[str], *, limit_s: float, env: Mapping[str, str] | None = None,
        on_line: Callable[[str], None] = lambda line: None, meanwhile: Callable[[], None] | None = None,
        tail_lines: int = 40, grace_s: float = 30.0) -> Finished:
    """Run `cmd` to its end or its time limit; each line of its output (stderr included) goes to
    `on_line`. `meanwhile` runs in a thread while it runs. If this process is interrupted while
    waiting (a task killed, Ctrl-C), the program is stopped before the interruption goes on."""
    tail: collections.deque[str] = collections.deque(maxlen=tail_lines)
    started = time.perf_counter()
    proc = subprocess.Popen(list(cmd), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, bufsize=1, env=dict(env) if env is not None else None, process_group=0)
    expired = threading.Event()

    def expire() -> None:
        expired.set()
        stop(proc, grace_s)

    timer = threading.Timer(limit_s, expire)
    timer.start()
    side = threading.Thread(target=meanwhile, name="meanwhile", daemon=True) if meanwhile else None
    if side:
        side.start()
    try:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.rstrip()
            tail.append(line)
            on_line(line)
        rc = proc.wait()
    finally:
        timer.cancel()
        stop(proc, grace_s)  # interrupted: do not leave the program (and the GPU) busy
        _signal_group(proc.pid, signal.SIGKILL)  # what the program left behind it
        if side:
            side.join()
    return Finished(rc, expired.is_set() and rc != 0, list(tail), time.perf_counter() - started)


def stop(proc: subprocess.Popen[str], grace_s: float = 30.0) -> None:
    """SIGTERM to the program's process group and to the groups of what it started in sessions of their
    own, then SIGKILL to them all once the program has ended or `grace_s` has passed: nothing it started
    outlives it."""
    if proc.poll() is not None:
        return
    groups = {proc.pid, *_groups(_descendants(proc.pid))} - {os.getpgrp()}  # never this process's own
    for group in groups:
        _signal_group(group, signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        pass
    for group in groups:
        _signal_group(group, signal.SIGKILL)
    proc.wait()


def _descendants(pid: int) -> list[int]:
    """Every process below `pid`, from /proc (none where there is no /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])  # after the name, which may hold spaces
        except (OSError, IndexError, ValueError):  # ended meanwhile
            continue
        children.setdefault(parent, []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        below = children.get(todo.pop(), [])
        found += below
        todo += below
    return found


def _groups(pids: list[int]) -> set[int]:
    groups = set()
    for pid in pids:
        try:
            groups.add(os.getpgid(pid))
        except ProcessLookupError:
            pass
    return groups


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):  # the group is gone already
        pass
