"""Seeds pooled per method, and SketchTune against each baseline by a paired test over items.

A comparison row of `compare` holds, for one method and seed, every test item's outcome
(`evaluate(..., per_item=True)`). Here the rows of a method are pooled: per item, its outcome is
averaged over the method's seeds; two methods are then compared item by item with the paired
sign-flip test (`evaluate.stats.sign_flip_p`), which needs no distributional assumption, counts
each item once however many seeds ran, and for 0/1 outcomes of one seed is the exact McNemar test.
Averaging over seeds hides how much a method's result moves from seed to seed, so beside it runs
Welch's t-test over the methods' per-seed values (where both have two seeds or more): a gap the
item test finds can still be one seed's luck, which the seed test then reports as within noise.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable

from .evaluate.stats import ALPHA, sign_flip_p, verdict, welch_p


def by_method(rows: Iterable[dict]) -> dict[str, list[dict]]:
    """The rows of each method (one per seed), methods in first-seen order."""
    grouped: dict[str, list[dict]] = {}
    for row in rows:
        grouped.setdefault(row["method"], []).append(row)
    return grouped


POOLED = "pooled loglik acc"


def metrics(row: dict) -> dict[str, tuple[list[float], list[int] | None, bool]]:
    """Each scored metric of a row: (per-item outcomes, per-item weights, lower is better).
    NLL items are weighted by their response tokens; accuracies count each item once."""
    found = {"held-out NLL": (row["heldout"]["per_item"]["loss"],
                              row["heldout"]["per_item"]["tokens"], True)}
    pooled: list[float] = []
    for task, scores in row["tasks"].items():
        for protocol, result in scores.items():
            if "per_item" in result and "correct" in result["per_item"]:
                found[f"{task} {protocol} acc"] = (result["per_item"]["correct"], None, False)
                if protocol == "loglik":
                    pooled += result["per_item"]["correct"]
    # Every log-likelihood item at once (micro accuracy): one test over all tasks' items,
    # still whole-number outcomes, so the sign-flip test stays exact.
    if sum(1 for name in found if name.endswith(" loglik acc")) > 1:
        found[POOLED] = (pooled, None, False)
    return found


def metric_value(outcomes: list[float], weights: list[int] | None) -> float:
    """A metric from its items: token-weighted NLL (outcomes are summed losses) or accuracy."""
    return sum(outcomes) / (sum(weights) if weights else len(outcomes))


def summary(rows: list[dict]) -> dict[str, dict]:
    """Per metric over a method's seeds: mean, sample std (0 for one seed) and seed count."""
    values: dict[str, list[float]] = {}
    for row in rows:
        for name, (outcomes, weights, _) in metrics(row).items():
            values.setdefault(name, []).append(metric_value(outcomes, weights))
    return {
        name: {"mean": statistics.fmean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0,
               "seeds": len(v)}
        for name, v in values.items()
    }


def paired(a_rows: list[dict], b_rows: list[dict], metric: str, alpha: float = ALPHA) -> dict:
    """Method A against method B on one metric, each item averaged over its method's seeds."""
    a = [metrics(r)[metric] for r in a_rows]
    b = [metrics(r)[metric] for r in b_rows]
    n = len(a[0][0])
    if any(len(outcomes) != n for outcomes, _, _ in a + b):
        raise ValueError(f"{metric}: the methods were scored on different items")
    weights, lower_is_better = a[0][1], a[0][2]
    # Scaled by both seed counts, 0/1 outcomes stay whole numbers: the test is then exact.
    scale_a, scale_b = len(b), len(a)
    diffs = [
        scale_a * sum(o[i] for o, _, _ in a) - scale_b * sum(o[i] for o, _, _ in b)
        for i in range(n)
    ]
    denominator = len(a) * len(b) * (sum(weights) if weights else n)
    difference = sum(diffs) / denominator
    p = sign_flip_p(diffs)
    per_seed_a = [metric_value(o, w) for o, w, _ in a]
    per_seed_b = [metric_value(o, w) for o, w, _ in b]
    seed_p = welch_p(per_seed_a, per_seed_b) if min(len(a), len(b)) > 1 else None
    return {
        "metric": metric,
        "a_value": metric_value([statistics.fmean(o[i] for o, _, _ in a) for i in range(n)],
                                weights),
        "b_value": metric_value([statistics.fmean(o[i] for o, _, _ in b) for i in range(n)],
                                weights),
        "difference": difference,
        "p": p,
        "verdict": verdict(difference, p, lower_is_better, alpha),
        "items": n,
        "seeds": [len(a), len(b)],
        "seed_p": seed_p,  # Welch's t over the per-seed values; None below two seeds a side
        "seed_verdict": None if seed_p is None
        else verdict(difference, seed_p, lower_is_better, alpha),
    }


def comparisons(rows: Iterable[dict], alpha: float = ALPHA) -> list[dict]:
    """Every sketch method against every other method, on every metric both were scored on."""
    grouped = by_method(rows)
    found = []
    for a, a_rows in grouped.items():
        if not a.startswith("sketch"):
            continue
        for b, b_rows in grouped.items():
            if b.startswith("sketch"):
                continue
            shared = [m for m in metrics(a_rows[0]) if m in metrics(b_rows[0])]
            found += [{"a": a, "b": b, **paired(a_rows, b_rows, m, alpha)} for m in shared]
    return found


def mean_std(value: dict, digits: int) -> str:
    """ "0.512 ± 0.004" (no ± for one seed)."""
    if value["seeds"] == 1 or math.isnan(value["std"]):
        return f"{value['mean']:.{digits}f}"
    return f"{value['mean']:.{digits}f} ± {value['std']:.{digits}f}"
