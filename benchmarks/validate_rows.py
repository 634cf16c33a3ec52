"""Wall time of the data-quality gate on N rows (default 100,000). Target: under 60 s.

    .venv/bin/python benchmarks/validate_rows.py [--rows 100000]

The rows are the shipped Korean sample repeated with distinct questions and
keys; the fit check tokenises every row with the demo's tiny tokenizer (built
if missing). Prints the time of each phase and the gate's verdict.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from demo_stages import machine  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=100_000)
    args = parser.parse_args()

    import subprocess

    from ml.config import load_config
    from ml.sources import load_records
    from ml.validate import gate, gate_tokenizer

    subprocess.run([sys.executable, "-m", "ml", "tiny-model", "--profile", "demo"], check=True, cwd=ROOT,
                   capture_output=True)
    cfg = load_config("demo", {"validation.max_rows": max(args.rows, 1)})
    base = load_records(cfg.data)
    records = []
    for i in range(args.rows):
        r = base[i % len(base)]
        records.append({**r, "key": f"{r['key']}-{i}", "QUESTION": f"{r['QUESTION'][:-1]} (사례 {i})?"})

    t0 = time.perf_counter()
    tokenizer = gate_tokenizer(cfg)
    t1 = time.perf_counter()
    report = gate(records, cfg, tokenizer)
    t2 = time.perf_counter()
    print(f"Machine: {machine()}")
    print(f"rows: {report.rows:,}; expectations: {len(report.checks)}; gate: "
          f"{'passed' if report.success else 'FAILED'}; truncated share {report.truncated_share:.1%}")
    print(f"tokenizer load {t1 - t0:.1f} s, validation (frame + tokenising + GX) {t2 - t1:.1f} s, "
          f"total {t2 - t0:.1f} s (target < 60 s: {'met' if t2 - t0 < 60 else 'MISSED'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
