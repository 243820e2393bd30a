"""Heat map of log2(sketch error / low-rank error) per decoder block and projection."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
from matplotlib.colors import TwoSlopeNorm  # noqa: E402

from .metrics import COMPARISONS  # noqa: E402

# the like-for-like truncations: (sketch key, low-rank key, label)
PANELS = [(s, lr, label) for (s, lr), label in COMPARISONS.items() if lr != "rank_h_opt"]


def _ratio_grid(records: list[dict], sketch: str, low_rank: str, projections: list[str]):
    """(blocks, projections) grid of log2 ratios; NaN where a layer is missing."""
    blocks = max(r["block"] for r in records) + 1
    grid = [[math.nan] * len(projections) for _ in range(blocks)]
    for r in records:
        if r[low_rank] > 0 and r[sketch] > 0:
            grid[r["block"]][projections.index(r["projection"])] = math.log2(
                r[sketch] / r[low_rank]
            )
    return grid


def plot_heatmap(records: list[dict], out_png: str | Path, title: str = "") -> Path:
    """One panel per comparison present in the records; blue: the sketch is more accurate."""
    projections = list(dict.fromkeys(r["projection"] for r in records))
    panels = [p for p in PANELS if p[0] in records[0] and p[1] in records[0]]
    grids = [_ratio_grid(records, s, lr, projections) for s, lr, _ in panels]
    finite = [abs(v) for g in grids for row in g for v in row if not math.isnan(v)]
    limit = max(finite, default=1.0) or 1.0
    height = max(3.0, 0.14 * len(grids[0]) + 1.8)
    fig, axes = plt.subplots(
        1, len(panels), figsize=(3.2 * len(panels), height), squeeze=False, layout="constrained"
    )
    norm = TwoSlopeNorm(vcenter=0.0, vmin=-limit, vmax=limit)
    blocks = len(grids[0])
    for ax, grid, (_, _, label) in zip(axes[0], grids, panels, strict=True):
        image = ax.imshow(grid, cmap="RdBu_r", norm=norm, aspect="auto", interpolation="nearest")
        ax.set_title(label.replace(" (", "\n("), fontsize=8)
        ax.set_xticks(range(len(projections)))
        ax.set_xticklabels([p.rsplit(".", 1)[-1] for p in projections], rotation=60, fontsize=7)
        ax.set_yticks(range(0, blocks, max(1, blocks // 10)))
        ax.tick_params(axis="y", labelsize=7)
    axes[0][0].set_ylabel("decoder block", fontsize=8)
    bar = fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8)
    bar.set_label("log2(sketch error / rank-r error)", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return Path(out_png)
