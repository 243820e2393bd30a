"""Per-layer comparison, and what it writes: JSON, CSV, a heat map and a one-paragraph summary."""

from __future__ import annotations

import csv
import functools
import re
import statistics
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..atomic import write_json_atomic
from .metrics import (
    COMPARISONS,
    free_codes_approx,
    frozen_codes_approx,
    rank_errors,
    rank_for_budget,
    relative_error,
    sketch_errors,
    sketch_params,
)
from .plot import plot_heatmap
from .sources import DeltaOf, Subject


@dataclass
class Budget:
    params_per_layer: int | None = None  # low-rank budget; None: the sketch's own value count
    sample_rows: int = 128  # rows per layer for the sketch errors; 0: all
    seed: int = 0


def _sample_rows(d_out: int, count: int, seed: int) -> torch.Tensor:
    if count <= 0 or count >= d_out:
        return torch.arange(d_out)
    return torch.randperm(d_out, generator=torch.Generator().manual_seed(seed))[:count].sort()[0]


def _block_and_projection(name: str) -> tuple[int, str]:
    """"model.layers.3.self_attn.q_proj" -> (3, "self_attn.q_proj")."""
    match = re.search(r"\.(\d+)\.(.+)$", name)
    return (int(match[1]), match[2]) if match else (0, name)


@functools.lru_cache(maxsize=8)
def _noise(d_out: int, d_in: int, seed: int) -> torch.Tensor:
    return torch.randn(d_out, d_in, generator=torch.Generator().manual_seed(seed))


@functools.lru_cache(maxsize=32)
def _noise_rank_free(d_out: int, d_in: int, rank: int, rows: int, bits: int, gpr: int,
                     seed: int) -> tuple[float, float]:
    noise = _noise(d_out, d_in, seed)
    free = relative_error(noise[:rows], free_codes_approx(noise[:rows], gpr, bits))
    return rank_errors(noise, rank, None)["rank"], free


def noise_reference(
    shape: tuple[int, int], rows: torch.Tensor, codes: torch.Tensor, rank: int, bits: int,
    gpr: int, seed: int,
) -> dict[str, float]:
    """The three Frobenius errors on i.i.d. Gaussian noise of the layer's shape (same rows and
    codes): what the approximations achieve on an update without any structure."""
    noise = _noise(*shape, seed)[rows]
    rank_err, free = _noise_rank_free(*shape, rank, len(rows), bits, gpr, seed)
    frozen = relative_error(noise, frozen_codes_approx(noise, codes, gpr, bits))
    return {"rank_noise": rank_err, "frozen_noise": frozen, "free_noise": free}


def analyze_layer(
    subject: Subject, name: str, delta: torch.Tensor, hessian: torch.Tensor | None,
    budget: Budget, index: int,
) -> dict:
    """One layer's record: shapes, budgets and every error (sketch errors on sampled rows)."""
    d_out, d_in = delta.shape
    params = sketch_params(d_out, subject.bits, subject.gpr)
    rank = rank_for_budget(d_out, d_in, budget.params_per_layer or params)
    rows = _sample_rows(d_out, budget.sample_rows, budget.seed + index)
    codes = subject.codes_for(name, rows)
    block, projection = _block_and_projection(name)
    weight = subject.model.get_submodule(name).weight.detach()
    return {
        "layer": name, "block": block, "projection": projection, "d_out": d_out, "d_in": d_in,
        "sketch_params": params, "rank_r": rank, "rank_params": rank * (d_out + d_in),
        "rows_sampled": len(rows),
        "delta_over_weight": float(delta.norm() / weight.norm().clamp_min(1e-30)),
        **rank_errors(delta, rank, hessian),
        **sketch_errors(delta[rows], codes, hessian, subject.bits, subject.gpr),
        **noise_reference((d_out, d_in), rows, codes, rank, subject.bits, subject.gpr, budget.seed),
    }


def analyze_layers(
    subject: Subject, delta_of: DeltaOf, hessians: dict[str, torch.Tensor] | None,
    budget: Budget, progress: bool = True,
) -> list[dict]:
    records = []
    for index, name in enumerate(tqdm(subject.layers, desc="layers", disable=not progress)):
        hessian = None if hessians is None else hessians[name]
        records.append(analyze_layer(subject, name, delta_of(name), hessian, budget, index))
    return records


def win_counts(records: list[dict]) -> dict[str, dict]:
    """Per comparison ("frozen_vs_rank", ...): on how many layers the sketch error is the smaller,
    and the median errors."""
    counts = {}
    for (sketch, low_rank), label in COMPARISONS.items():
        pairs = [(r[sketch], r[low_rank]) for r in records if sketch in r and low_rank in r]
        if pairs:
            counts[f"{sketch}_vs_{low_rank}"] = {
                "label": label, "sketch_wins": sum(s < lr for s, lr in pairs),
                "layers": len(pairs), "median_sketch": statistics.median(s for s, _ in pairs),
                "median_low_rank": statistics.median(lr for _, lr in pairs),
            }
    return counts


def summary_text(records: list[dict], subject: Subject, budget: Budget, source: str) -> str:
    """The paragraph the CLI prints."""
    counts = win_counts(records)
    n = len(records)
    ranks = sorted({r["rank_r"] for r in records})

    def wins(key: str) -> str:
        c = counts[key]
        return (f"{c['sketch_wins']} of {n} layers (median error {c['median_sketch']:.3f} vs "
                f"{c['median_low_rank']:.3f})")

    budget_text = (f"{budget.params_per_layer} parameters per layer for low rank"
                   if budget.params_per_layer else "the sketch's own value count per layer")
    text = (
        f"Update: {source}. At {budget_text} ({subject.bits}-bit gpr {subject.gpr} sketch; rank r "
        f"{ranks[0]}..{ranks[-1]}), the sketch with frozen codes (values-only, what SketchTune "
        f"trains) beats the rank-r truncated SVD on {wins('frozen_vs_rank')}; a sketch learned "
        f"for ΔW itself (free codes) on {wins('free_vs_rank')}."
    )
    if "frozen_h_vs_rank_h" in counts:
        text += (
            " Hessian-weighted (the error the layer outputs see), against the same truncation: "
            f"frozen codes win on {wins('frozen_h_vs_rank_h')}, free codes on "
            f"{wins('free_h_vs_rank_h')}; against the H-optimal (whitened) rank-r: frozen "
            f"{counts['frozen_h_vs_rank_h_opt']['sketch_wins']}, free "
            f"{counts['free_h_vs_rank_h_opt']['sketch_wins']} of {n}."
        )
    noise = {key: statistics.median(r[f"{key}_noise"] for r in records)
             for key in ("rank", "frozen", "free")}
    text += (
        f" On i.i.d. Gaussian noise of the same shapes the same three reach median errors "
        f"{noise['rank']:.3f} (rank-r), {noise['frozen']:.3f} (frozen) and {noise['free']:.3f} "
        "(free): an error near the noise level means the update has no structure of that kind."
    )
    rows = "all rows" if budget.sample_rows <= 0 else f"{budget.sample_rows} sampled rows"
    return text + (
        f" Free codes also spend {subject.bits} bits per weight on new codes that the parameter "
        "count leaves out: read them as the reach of a sketch re-learned for this update, and "
        f"frozen codes as the like-for-like comparison. Sketch errors use {rows} per layer; codes "
        f"from {subject.codes_origin}."
    )


def write_outputs(result: dict, out_dir: str | Path, stem: str = "analyze") -> dict[str, Path]:
    """`stem`.json (everything), `stem`.csv (per layer) and `stem`.png (heat map)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {kind: out / f"{stem}.{kind}" for kind in ("json", "csv", "png")}
    write_json_atomic(paths["json"], result)
    records = result["layers"]
    with open(paths["csv"], "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)
    plot_heatmap(records, paths["png"], title=result.get("title", ""))
    return paths

