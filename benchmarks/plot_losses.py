"""Plot the loss curves of train_gpu.py rows from one results file (same data, same call).

    python benchmarks/plot_losses.py docs/results/h100-2026-11-24-call4.jsonl seed default seed_fast \
        --out docs/img/loss_seed_vs_default.png
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path)
    parser.add_argument("variants", nargs="+")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    rows = {r["variant"]: r for r in map(json.loads, args.results.read_text().splitlines()) if "loss" in r}

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    for name, style in zip(args.variants, ("-", "--", ":", "-."), strict=False):
        r = rows[name]
        loss = r["loss"]
        label = (f"{name}: {r['batch']} x {r['accum']}, {'grouped' if r['group_by_length'] else 'random order'}"
                 f" (mean {statistics.mean(loss):.3f} ± {statistics.stdev(loss):.3f})")
        ax.plot(range(1, len(loss) + 1), loss, style, label=label)
        print(label)
    ax.set_xlabel("optimizer step (12 examples each)")
    ax.set_ylabel("training loss")
    ax.set_title(f"Same data, same schedule: {args.results.name}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out)


if __name__ == "__main__":
    main()
