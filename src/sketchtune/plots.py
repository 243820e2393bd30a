"""PNG figures people would rather look at than read (matplotlib, no display needed)."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)


def plot_loss(metrics_jsonl: Path, out_png: Path) -> Path:
    """Training loss against step, from the records of metrics.jsonl that carry a loss."""
    steps, losses = [], []
    for line in Path(metrics_jsonl).read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            steps.append(record["step"])
            losses.append(record["loss"])
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(steps, losses, marker="o", markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (response tokens)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return Path(out_png)
