"""Learning one layer's sketch from its weight W (d_out, d_in) and input Hessian H (d_in, d_in).

Data-aware path (DESIGN section 1), in two named steps after `prepare` (damp H, order columns by
descending diag(H), take the upper Cholesky factor of H⁻¹):
- `fit_tables`: each (row, group) table by importance-weighted 1-D k-means (exact by default, see
  kmeans.py), the importances coming from that factor's diagonal;
- `assign_codes`: codes column by column, each rounding error pushed onto the columns not yet coded
  (GPTQ-style error compensation). It takes any tables, so fixed uniform grids give plain GPTQ.
The plain path (no H) is per-row k-means with nearest-entry codes only.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch

from .kmeans import exact_kmeans_1d, lloyd_kmeans_1d

KMEANS = {"exact": exact_kmeans_1d, "lloyd": lloyd_kmeans_1d}


class LayerSketch(NamedTuple):
    codes: torch.Tensor  # (d_out, d_in) uint8
    values: torch.Tensor  # (d_out, gpr, 2**bits) fp32
    # (d_out,) GPTQ's loss per row, Σ_c ((w_c - q_c) / U_cc)² / 2: the increase of the
    # Hessian-weighted output error the codes cost; None on the plain path (no Hessian)
    row_loss: torch.Tensor | None


class Prepared(NamedTuple):
    weight: torch.Tensor  # fp32 copy, columns no calibration input reaches zeroed
    perm: torch.Tensor  # the order columns are coded in (descending diag H with act order)
    upper: torch.Tensor  # upper Cholesky factor of the damped H⁻¹, rows and columns in `perm` order


def nearest_code(column: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
    """column (d_out,), tables (d_out, K) -> index of the nearest table entry per row (d_out,)."""
    return (column[:, None] - tables).abs().argmin(dim=1)


def inverse_hessian_factor(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor U of (H + λ·mean(diag H)·I)⁻¹; λ grows until H is positive definite."""
    eye = torch.eye(hessian.shape[0], dtype=hessian.dtype, device=hessian.device)
    mean_diag = hessian.diagonal().mean()
    for attempt in range(6):
        damped = hessian + (damp * 10**attempt) * mean_diag * eye
        lower, info = torch.linalg.cholesky_ex(damped)
        if info == 0:
            inverse = torch.cholesky_inverse(lower)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if info == 0:
                return upper
    raise ValueError("input Hessian is not positive definite even after heavy damping")


def prepare(
    weight: torch.Tensor, hessian: torch.Tensor, damp: float = 0.01, act_order: bool = True
) -> Prepared:
    """Dead columns (H_cc == 0) zeroed with H_cc = 1, the column order, and the factor U."""
    w = weight.detach().float().clone()
    h = hessian.detach().float().clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    d_in = w.shape[1]
    perm = (
        torch.argsort(h.diagonal(), descending=True)
        if act_order
        else torch.arange(d_in, device=w.device)
    )
    return Prepared(w, perm, inverse_hessian_factor(h[perm][:, perm], damp))


def column_importance(prepared: Prepared, power: float = 4.0) -> torch.Tensor:
    """ω_c = U_cc^(-power) per column, in original column order, scaled to mean 1 (only relative
    weights matter; it keeps fp32 sane)."""
    importance = torch.empty_like(prepared.upper.diagonal())
    importance[prepared.perm] = prepared.upper.diagonal().pow(-power)
    return importance / importance.mean()


def fit_tables(
    weight: torch.Tensor,
    importance: torch.Tensor | None,
    bits: int,
    gpr: int,
    kmeans: Literal["exact", "lloyd"] = "exact",
) -> torch.Tensor:
    """(d_out, gpr, 2**bits) tables: weighted 1-D k-means of every (row, group) of `weight`, each
    column weighted by `importance` (d_in,), or equally when it is None."""
    d_out, d_in = weight.shape
    group = d_in // gpr
    if importance is None:
        importance = torch.ones(d_in, device=weight.device)
    column_weights = importance.reshape(1, gpr, group).expand(d_out, gpr, group)
    tables = KMEANS[kmeans](
        weight.reshape(-1, group), column_weights.reshape(-1, group), 1 << bits
    )
    return tables.reshape(d_out, gpr, 1 << bits)


def assign_codes(
    prepared: Prepared,
    tables: torch.Tensor,
    group_of: torch.Tensor,
    column_batch: int = 128,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Error-compensated codes for `prepared.weight` against any tables.

    tables: (d_out, n_groups, K); group_of: (d_in,) the table group of each column, in original
    column order. Columns are coded in `prepared.perm` order; within a batch of `column_batch`
    columns the errors are pushed at once, onto later batches in one matrix product (GPTQ's lazy
    updates: the same codes as pushing after every column, fewer passes over W). Returns (codes
    (d_out, d_in) int64 in original order, row loss (d_out,); see `LayerSketch`)."""
    w_perm = prepared.weight[:, prepared.perm]  # a copy: the errors are pushed into it
    upper, d_in = prepared.upper, w_perm.shape[1]
    group_perm = group_of.to(w_perm.device)[prepared.perm]
    codes_perm = torch.empty(w_perm.shape, dtype=torch.int64, device=w_perm.device)
    row_loss = torch.zeros(w_perm.shape[0], dtype=w_perm.dtype, device=w_perm.device)
    for start in range(0, d_in, column_batch):
        end = min(start + column_batch, d_in)
        batch = w_perm[:, start:end]  # a view: pushed errors land in w_perm
        errors = torch.empty_like(batch)
        u_batch = upper[start:end, start:end]
        for i in range(end - start):
            table = tables[:, group_perm[start + i], :]  # (d_out, K)
            code = nearest_code(batch[:, i], table)
            codes_perm[:, start + i] = code
            err = (batch[:, i] - table.gather(1, code[:, None]).squeeze(1)) / u_batch[i, i]
            batch[:, i + 1 :] -= err[:, None] * u_batch[i, i + 1 :][None, :]
            errors[:, i] = err
        row_loss += errors.pow(2).sum(dim=1) / 2
        w_perm[:, end:] -= errors @ upper[start:end, end:]
    codes = torch.empty_like(codes_perm)
    codes[:, prepared.perm] = codes_perm
    return codes, row_loss


def learn_sketch(
    weight: torch.Tensor,
    hessian: torch.Tensor | None,
    bits: int = 4,
    gpr: int = 4,
    damp: float = 0.01,
    importance_power: float = 4.0,
    act_order: bool = True,
    column_batch: int = 128,
    kmeans: Literal["exact", "lloyd"] = "exact",
) -> LayerSketch:
    """`fit_tables` then `assign_codes`. With `hessian=None` this is plain per-(row, group)
    k-means with nearest-centroid codes."""
    d_out, d_in = weight.shape
    if hessian is None:
        w = weight.detach().float()
        tables = fit_tables(w, None, bits, gpr, kmeans)
        grouped = w.reshape(d_out, gpr, d_in // gpr, 1)
        codes = (grouped - tables[:, :, None, :]).abs().argmin(-1).reshape(d_out, d_in)
        return LayerSketch(codes.to(torch.uint8), tables, None)
    prepared = prepare(weight, hessian, damp, act_order)
    importance = column_importance(prepared, importance_power)
    tables = fit_tables(prepared.weight, importance, bits, gpr, kmeans)
    group_of = torch.arange(d_in, device=tables.device) // (d_in // gpr)
    codes, row_loss = assign_codes(prepared, tables, group_of, column_batch)
    return LayerSketch(codes.to(torch.uint8), tables, row_loss)
