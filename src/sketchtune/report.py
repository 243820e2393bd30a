"""Comparison tables as files: results.json, results.md, results.csv and a PNG chart."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from .data.registry import loglik_tasks
from .plots import plot_comparison


def _ci(result: dict) -> str:
    low, high = result.get("ci95", (float("nan"), float("nan")))
    return f"{result['accuracy']:.3f} [{low:.3f}, {high:.3f}]"


def _nll(row: dict) -> str:
    ci = row.get("heldout", {}).get("nll_ci95")
    return f"{row['heldout_nll']:.4f}" + (f" [{ci[0]:.4f}, {ci[1]:.4f}]" if ci else "")


def table_rows(results: dict) -> tuple[list[str], list[list[str]]]:
    """Header and rows shared by the Markdown and CSV tables."""
    tasks = results["settings"]["tasks"]
    scored = loglik_tasks(tasks)
    header = ["method", "held-out NLL [95% CI]", "trainable (M)", "base in memory (MB)",
              "train tokens/s", "peak memory (MB)"]
    header += [f"{t} loglik acc [95% CI]" for t in scored]
    header += [f"{t} acc_norm" for t in scored]
    if results["settings"].get("generate_limit"):
        header += [f"{t} generate acc [95% CI]" for t in tasks]
    rows = []
    for row in results["rows"]:
        cells = [
            row["method"],
            _nll(row),
            f"{row['trainable_parameters'] / 1e6:.2f}",
            f"{row['base_bytes'] / 1e6:.1f}",
            f"{row['train_tokens_per_second']:.0f}" if "train_tokens_per_second" in row else "-",
            f"{row['peak_rss_bytes'] / 1e6:.0f}",
        ]
        cells += [_ci(row["tasks"][t]["loglik"]) for t in scored]
        cells += [f"{row['tasks'][t]['loglik'].get('acc_norm', float('nan')):.3f}" for t in scored]
        if results["settings"].get("generate_limit"):
            cells += [_ci(row["tasks"][t]["generate"]) for t in tasks]
        rows.append(cells)
    return header, rows


def write_comparison(results: dict, folder: Path) -> None:
    folder = Path(folder)
    (folder / "results.json").write_text(json.dumps(results, indent=2))
    header, rows = table_rows(results)
    with (folder / "results.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    (folder / "results.md").write_text("\n".join(lines) + "\n")
    plot_comparison(results, folder / "comparison.png")
