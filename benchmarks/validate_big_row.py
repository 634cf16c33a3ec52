"""Memory, time and report size of the gate on the shipped sample with one 50 MB answer.

    .venv/bin/python benchmarks/validate_big_row.py [--mb 50]

Runs `python -m ml validate --profile demo` on it in a child process and prints one
'RESULT {json}' line: the child's peak resident memory, its wall time, and the report's size.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=50.0, help="size of the one long answer")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="big-row-"))
    rows = [json.loads(line) for line in (ROOT / "data/sample/pubmedqa_ko_sample.jsonl").read_text().splitlines()]
    word = "가나다라마바사 "  # 22 bytes in UTF-8
    rows[5]["LONG_ANSWER"] = word * int(args.mb * 1e6 / len(word.encode()))
    data = work / "big.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "ml", "validate", "--profile", "demo", "--data", str(data),
                          "--report", str(work / "validation.json")], cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    print("RESULT " + json.dumps({"answer_mb": args.mb, "exit": out.returncode, "seconds": round(seconds, 1),
                                  "peak_rss_gib": round(peak_kib / 2**20, 2),
                                  "report_kib": round((work / "validation.json").stat().st_size / 1024, 1),
                                  "summary": out.stdout.strip().splitlines()[-1][:200]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
