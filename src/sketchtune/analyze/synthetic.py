"""Matrix classes with a known answer to "sketch or low rank?", no model needed.

Each class draws a (d_out, d_in) update; the table reports the rank-r, frozen-codes and free-codes
errors at the budget of a `bits`-bit, `gpr` sketch. Frozen codes are those of a plain k-means
sketch of an unrelated Gaussian base weight, except for "base-aligned", which changes only that
sketch's values and so is exactly what a values-only fine-tune can express.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..format import dequantize
from ..learn import learn_sketch
from .metrics import (
    rank_errors,
    rank_for_budget,
    sketch_errors,
    sketch_params,
)

Draw = Callable[[int, int, torch.Generator], torch.Tensor]


def _low_rank(d_out: int, d_in: int, gen: torch.Generator, rank: int = 4) -> torch.Tensor:
    return torch.randn(d_out, rank, generator=gen) @ torch.randn(rank, d_in, generator=gen)


def _sparse(d_out: int, d_in: int, gen: torch.Generator, density: float = 0.05) -> torch.Tensor:
    mask = torch.rand(d_out, d_in, generator=gen) < density
    return torch.randn(d_out, d_in, generator=gen) * mask


def _few_values(d_out: int, d_in: int, gen: torch.Generator, distinct: int = 4) -> torch.Tensor:
    """Every row picks each entry from its own `distinct` random values."""
    table = torch.randn(d_out, distinct, generator=gen)
    picks = torch.randint(distinct, (d_out, d_in), generator=gen)
    return table.gather(1, picks)


def _identity_like(
    d_out: int, d_in: int, gen: torch.Generator, noise: float = 0.01
) -> torch.Tensor:
    return torch.eye(d_out, d_in) + noise * torch.randn(d_out, d_in, generator=gen)


def _gaussian(d_out: int, d_in: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(d_out, d_in, generator=gen)


CLASSES: dict[str, Draw] = {
    "low-rank (rank 4)": _low_rank,
    "sparse (5% nonzero)": _sparse,
    "few values per row (4)": _few_values,
    "identity + 1% noise": _identity_like,
    "random Gaussian": _gaussian,
}


def synthetic_table(
    d_out: int = 256, d_in: int = 256, bits: int = 4, gpr: int = 4, seed: int = 0
) -> list[dict]:
    """Frobenius errors of the three approximations per class, at the sketch's parameter count."""
    gen = torch.Generator().manual_seed(seed)
    params = sketch_params(d_out, bits, gpr)
    rank = rank_for_budget(d_out, d_in, params)
    codes, values, _ = learn_sketch(torch.randn(d_out, d_in, generator=gen), None, bits, gpr)
    draws = {name: draw(d_out, d_in, gen) for name, draw in CLASSES.items()}
    new_values = values + torch.randn(values.shape, generator=gen)
    draws["base-aligned (new values, same codes)"] = dequantize(codes, new_values) - dequantize(
        codes, values
    )
    table = []
    for name, delta in draws.items():
        errors = rank_errors(delta, rank, None) | sketch_errors(delta, codes, None, bits, gpr)
        table.append({"class": name, "params": params, "rank_r": rank, **errors})
    return table


def format_table(table: list[dict]) -> str:
    """The table as aligned text, one class per line."""
    lines = [f"{'class':40s} {'rank-r':>7s} {'frozen':>7s} {'free':>7s}"]
    lines += [
        f"{r['class']:40s} {r['rank']:7.3f} {r['frozen']:7.3f} {r['free']:7.3f}" for r in table
    ]
    return "\n".join(lines)
