"""Wall time of `make demo` per stage, on this machine. Target: both DAG runs under 3 minutes.

    .venv/bin/python benchmarks/demo_stages.py [--rebuild-model]

Runs scripts/demo.py in a fresh process (a clean demo state, as a user gets it)
and prints a Markdown table for docs/benchmarks.md with the machine named.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} cores ({cpu}), {mem:.0f} GiB RAM, Python {platform.python_version()}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rebuild-model", action="store_true", help="time the tiny-model build too")
    args = parser.parse_args()
    if args.rebuild_model:
        shutil.rmtree(ROOT / "state" / "models" / "tiny-llama-ko", ignore_errors=True)
    t0 = time.perf_counter()
    demo = subprocess.run([sys.executable, str(ROOT / "scripts" / "demo.py")], cwd=ROOT,
                          capture_output=True, text=True)
    if demo.returncode:
        print(demo.stdout[-3000:], demo.stderr[-3000:], sep="\n", file=sys.stderr)
        return demo.returncode
    total = time.perf_counter() - t0
    timings = json.loads((ROOT / "state" / "demo" / "timings.json").read_text())
    runs = sum(v for k, v in timings.items() if k.startswith("DAG run"))
    print(f"Machine: {machine()}\n")
    print("| stage | seconds |\n| --- | ---: |")
    for name, seconds in timings.items():
        label = name.strip()
        print(f"| {'&nbsp;&nbsp;' if name.startswith(' ') else ''}{label} | {seconds:.1f} |")
    print(f"| **both DAG runs** | **{runs:.1f}** |\n| **whole `make demo` process** | **{total:.1f}** |")
    print(f"\ntarget: both DAG runs under 180 s -> {'met' if runs < 180 else 'MISSED'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
