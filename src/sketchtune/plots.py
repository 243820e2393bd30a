"""PNG figures people would rather look at than read (matplotlib, no display needed)."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)

from .data.registry import loglik_tasks  # noqa: E402


def _save(fig, out_png: Path) -> Path:
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return Path(out_png)


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
    return _save(fig, out_png)


def plot_comparison(results: dict, out_png: Path) -> Path:
    """Two panels: held-out NLL per method, and log-likelihood accuracy per task; error bars are
    a row's 95% CI (one seed) or mean ± std over seeds, as `report._plotted` sets them."""
    rows, tasks = results["rows"], loglik_tasks(results["settings"]["tasks"])
    methods = [r["method"] for r in rows]
    fig, (left, right) = plt.subplots(
        1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [1, 1 + 0.35 * len(tasks)]}
    )
    nlls = [r["heldout_nll"] for r in rows]
    spans = [r.get("heldout", {}).get("nll_ci95") or (r["heldout_nll"],) * 2 for r in rows]
    left.bar(methods, nlls, color="tab:blue",
             yerr=[[n - s[0] for n, s in zip(nlls, spans, strict=True)],
                   [s[1] - n for n, s in zip(nlls, spans, strict=True)]], capsize=3)
    left.set_ylabel("held-out NLL per response token (lower is better)")
    left.set_ylim(bottom=min(s[0] for s in spans) * 0.95)
    left.tick_params(axis="x", labelrotation=45)
    width = 0.8 / max(1, len(methods))
    for i, row in enumerate(rows):
        accs = [row["tasks"][t]["loglik"]["accuracy"] for t in tasks]
        lows = [a - row["tasks"][t]["loglik"]["ci95"][0] for a, t in zip(accs, tasks, strict=True)]
        highs = [row["tasks"][t]["loglik"]["ci95"][1] - a for a, t in zip(accs, tasks, strict=True)]
        xs = [j + i * width for j in range(len(tasks))]
        right.bar(xs, accs, width, yerr=[lows, highs], capsize=2, label=row["method"])
    right.set_xticks([j + width * (len(methods) - 1) / 2 for j in range(len(tasks))], tasks)
    right.tick_params(axis="x", labelrotation=30 if len(tasks) > 3 else 0)
    right.set_ylabel("log-likelihood accuracy")
    right.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.text(0.5, 0.01, "error bars: 95% CI for one seed, mean ± std over seeds", ha="center",
             fontsize=8)
    return _save(fig, out_png)
