"""Comparison tables as files: results.json, results.md, results.csv and a PNG chart."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from .data.registry import loglik_tasks
from .evaluate.stats import ALPHA
from .plots import plot_comparison
from .significance import POOLED, by_method, mean_std, metric_value, metrics, summary


def _ci(result: dict) -> str:
    low, high = result.get("ci95", (float("nan"), float("nan")))
    return f"{result['accuracy']:.3f} [{low:.3f}, {high:.3f}]"


def _nll(row: dict) -> str:
    ci = row.get("heldout", {}).get("nll_ci95")
    return f"{row['heldout_nll']:.4f}" + (f" [{ci[0]:.4f}, {ci[1]:.4f}]" if ci else "")


def _scores(rows: list[dict], name: str, one_seed: str, digits: int = 3) -> str:
    """One seed: the cell as `one_seed` writes it (with its 95% CI); more: mean ± std."""
    if len(rows) == 1:
        return one_seed
    return mean_std(summary(rows)[name], digits)


def _pooled(rows: list[dict]) -> str:
    """Accuracy over every log-likelihood item of every task; "-" for rows without items."""
    found = metrics(rows[0]).get(POOLED)
    if found is None:
        return "-"
    return _scores(rows, POOLED, f"{metric_value(found[0], found[1]):.3f}")


def _mean(rows: list[dict], get) -> float:
    return sum(get(r) for r in rows) / len(rows)


def table_rows(results: dict) -> tuple[list[str], list[list[str]]]:
    """Header and rows shared by the Markdown and CSV tables: one row per method, its seeds as
    mean ± std (one seed: the value and its 95% CI)."""
    tasks = results["settings"]["tasks"]
    scored = loglik_tasks(tasks)
    generate = bool(results["settings"].get("generate_limit"))
    header = ["method", "held-out NLL [95% CI] or mean ± std over seeds", "seeds", "lr",
              "trainable (M)", "base in memory (MB)", "train tokens/s", "peak memory (MB)"]
    pooled = len(scored) > 1
    if pooled:
        header += [POOLED]
    header += [f"{t} loglik acc [95% CI]" for t in scored]
    header += [f"{t} acc_norm" for t in scored]
    if generate:
        header += [f"{t} generate acc [95% CI]" for t in tasks]
    rows = []
    for method, group in by_method(results["rows"]).items():
        first = group[0]
        cells = [
            method,
            _scores(group, "held-out NLL", _nll(first), 4),
            str(len(group)),
            f"{first.get('lr', 0.0):g}",
            f"{first['trainable_parameters'] / 1e6:.2f}",
            f"{first['base_bytes'] / 1e6:.1f}",
            f"{_mean(group, lambda r: r['train_tokens_per_second']):.0f}"
            if "train_tokens_per_second" in first else "-",
            f"{max(r['peak_rss_bytes'] for r in group) / 1e6:.0f}",
        ]
        if pooled:
            cells += [_pooled(group)]
        cells += [_scores(group, f"{t} loglik acc", _ci(first["tasks"][t]["loglik"]))
                  for t in scored]
        cells += [f"{_mean(group, lambda r, t=t: r['tasks'][t]['loglik']['acc_norm']):.3f}"
                  for t in scored]
        if generate:
            cells += [_scores(group, f"{t} generate acc", _ci(first["tasks"][t]["generate"]))
                      for t in tasks]
        rows.append(cells)
    return header, rows


def _markdown(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(r) + " |" for r in rows)]


def test_lines(results: dict) -> list[str]:
    """SketchTune against each other method: the paired test's table, its test and level said."""
    found = results.get("comparisons", [])
    if not found:
        return []
    intro = (f"SketchTune against each method: paired sign-flip test over the test items "
             f"(each item's outcome averaged over its method's seeds), two-sided, alpha {ALPHA}; "
             "better / worse / within noise say how the first method fares. Beside it, where "
             "both methods ran two seeds or more, Welch's t-test over their per-seed values: "
             "whether the gap stands out from seed-to-seed spread.")
    header = ["method", "against", "metric", "first", "second", "difference", "p", "verdict",
              "seed p (Welch)", "seed verdict"]
    rows = [[c["a"], c["b"], c["metric"], f"{c['a_value']:.4f}", f"{c['b_value']:.4f}",
             f"{c['difference']:+.4f}", f"{c['p']:.3g}", c["verdict"],
             "-" if c["seed_p"] is None else f"{c['seed_p']:.3g}",
             c["seed_verdict"] or "-"] for c in found]
    return ["", intro, "", *_markdown(header, rows)]


def search_lines(results: dict) -> list[str]:
    """Every rate tried per method, its validation NLL, and the rate chosen."""
    search = results.get("lr_search", {})
    if not search:
        return []
    header = ["method", "validation NLL by learning rate", "chosen"]
    rows = [[m, ", ".join(f"{r}: {'diverged' if v is None else f'{v:.4f}'}"
                          for r, v in s["validation_nll"].items()), f"{s['chosen']:g}"]
            for m, s in search.items()]
    intro = ("Learning rates chosen by the NLL on a validation split carved from the training "
             "data (never a test set), one short run per rate.")
    return ["", intro, "", *_markdown(header, rows)]


def write_comparison(results: dict, folder: Path) -> None:
    folder = Path(folder)
    (folder / "results.json").write_text(json.dumps(results, indent=2))
    header, rows = table_rows(results)
    with (folder / "results.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    lines = [*_markdown(header, rows), *test_lines(results), *search_lines(results)]
    (folder / "results.md").write_text("\n".join(lines) + "\n")
    plot_comparison({**results, "rows": _plotted(results)}, folder / "comparison.png")


def _plotted(results: dict) -> list[dict]:
    """One row per method for the chart: seeds averaged, the interval mean ± std over seeds
    (one seed: the row as it is, with its 95% CI)."""
    plotted = []
    for method, group in by_method(results["rows"]).items():
        if len(group) == 1:
            plotted.append(group[0])
            continue
        means = summary(group)
        tasks = {}
        for t in loglik_tasks(results["settings"]["tasks"]):
            m = means[f"{t} loglik acc"]
            tasks[t] = {"loglik": {"accuracy": m["mean"],
                                   "ci95": [m["mean"] - m["std"], m["mean"] + m["std"]]}}
        nll = means["held-out NLL"]
        plotted.append({"method": method, "heldout_nll": nll["mean"], "tasks": tasks,
                        "heldout": {"nll_ci95": [nll["mean"] - nll["std"],
                                                 nll["mean"] + nll["std"]]}})
    return plotted
