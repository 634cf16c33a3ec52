"""Pictures people would rather look at than read: the training curve."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global figure state


def loss_curve(history: list[dict[str, Any]], out: Path, title: str = "",
               test_losses: dict[str, float] | None = None) -> Path:
    train = [(r["step"], r["loss"]) for r in history if "loss" in r]
    val = [(r["step"], r["eval_loss"]) for r in history if "eval_loss" in r]
    fig = Figure(figsize=(7, 4), dpi=110)
    ax = fig.subplots()
    if train:
        ax.plot([s for s, _ in train], [v for _, v in train], label="train loss", color="tab:blue", alpha=0.8)
    if val:
        ax.plot([s for s, _ in val], [v for _, v in val], "o-", label="validation loss", color="tab:orange")
    for (name, value), style in zip((test_losses or {}).items(), ("--", ":", "-."), strict=False):
        ax.axhline(value, linestyle=style, color="gray", label=f"{name} = {value:.3f}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss per answer token")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    return out
