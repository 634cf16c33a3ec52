"""Wall time and peak memory of the data-quality gate on N rows (default 100,000).

    .venv/bin/python benchmarks/validate_rows.py [--rows 100000]

Targets (issue 29): 100,000 rows in at most 20 s; at most 2 GiB of resident memory at the default
`validation.max_rows` (1,000,000 rows). The rows are the shipped Korean sample repeated with
distinct questions and keys; the fit check tokenises them with the demo's tiny tokenizer (built if
missing). Prints the time of each phase, the process's peak resident memory (and what it held
before the gate: imports and the rows themselves) and the gate's verdict. One size per process, so
that each peak is its own.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from demo_stages import machine  # noqa: E402


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000)
    args = parser.parse_args()

    import subprocess

    from ml import validate
    from ml.config import load_config
    from ml.sources import load_records

    subprocess.run([sys.executable, "-m", "ml", "tiny-model", "--profile", "demo"], check=True, cwd=ROOT,
                   capture_output=True)
    cfg = load_config("demo", {"validation.max_rows": max(args.rows, 1)})
    base = load_records(cfg.data)
    records = []
    for i in range(args.rows):
        r = base[i % len(base)]
        records.append({**r, "key": f"{r['key']}-{i}", "QUESTION": f"{r['QUESTION'][:-1]} (사례 {i})?"})

    t0 = time.perf_counter()
    tokenizer = validate.gate_tokenizer(cfg)
    before = peak_rss_gib()
    t1 = time.perf_counter()
    report = validate.gate(records, cfg, tokenizer)
    t2 = time.perf_counter()
    peak = peak_rss_gib()
    print(f"Machine: {machine()}")
    print(f"rows: {report.rows:,}; expectations: {len(report.checks)}; gate: "
          f"{'passed' if report.success else 'FAILED'}; truncated share {report.truncated_share:.1%}"
          f"{getattr(report, 'sample_note', '')}; chunk rows {getattr(validate, 'CHUNK_ROWS', 'all')}")
    print(f"tokenizer load {t1 - t0:.1f} s, validation (frames + tokenising + GX) {t2 - t1:.1f} s, "
          f"total {t2 - t0:.1f} s (target for 100,000 rows <= 20 s)")
    print(f"peak resident memory {peak:.2f} GiB (before the gate, imports and the rows: {before:.2f} GiB; "
          f"target at 1,000,000 rows <= 2 GiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
