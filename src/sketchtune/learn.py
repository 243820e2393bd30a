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

from collections.abc import Callable
from typing import Literal, NamedTuple

import numba
import numpy as np
import torch

from .kmeans import exact_kmeans_1d, lloyd_kmeans_1d

KMEANS = {"exact": exact_kmeans_1d, "lloyd": lloyd_kmeans_1d}
# learn_sketch's row chunks hold about 4M weights: their workspaces (fp32 copies, int64 codes,
# ~100 MB) stay small next to the d_in² factor.
CHUNK_WEIGHTS = 1 << 22
# Chunks are whole multiples of 64 rows and a smaller remainder joins the last one: MKL's sgemm
# rounds a row differently in a product of very few rows (or few per thread), and chunking must
# not change a bit of the result.
ROW_BLOCK = 64


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
    return _damped_inverse_factor(hessian.clone, damp)


def _damped_inverse_factor(build: Callable[[], torch.Tensor], damp: float) -> torch.Tensor:
    """`inverse_hessian_factor` of the matrix `build()` returns, a fresh copy this may overwrite
    (each retry builds another): at most two d_in² matrices are alive at once."""
    damped = build()
    mean_diag = damped.diagonal().mean()
    for attempt in range(6):
        if damped is None:
            damped = build()
        # λ onto the diagonal in place: the floats of H + λ·I, without an identity matrix
        damped.diagonal().add_((damp * 10**attempt) * mean_diag)
        lower, info = torch.linalg.cholesky_ex(damped)
        damped = None  # freed before the inverse exists; a retry builds H again
        if info == 0:
            inverse = torch.cholesky_inverse(lower)
            del lower
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            del inverse
            if info == 0:
                return upper
    raise ValueError("input Hessian is not positive definite even after heavy damping")


def _factor(
    hessian: torch.Tensor, damp: float, act_order: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`Prepared`'s perm and upper, and dead (d_in,) bool: the columns with H_cc == 0, which the
    factor sees with H_cc = 1. Built from one permuted fp32 copy; `hessian` is left as it is."""
    h = hessian.detach()
    diagonal = h.diagonal().to(torch.float32, copy=True)
    dead = diagonal == 0
    diagonal[dead] = 1.0
    perm = (
        torch.argsort(diagonal, descending=True)
        if act_order
        else torch.arange(h.shape[0], device=h.device)
    )
    dead_perm = dead[perm]

    def build() -> torch.Tensor:
        permuted = h.float()[perm[:, None], perm]  # one gather: no h[perm] intermediate
        permuted.diagonal()[dead_perm] = 1.0
        return permuted

    return perm, _damped_inverse_factor(build, damp), dead


def prepare(
    weight: torch.Tensor, hessian: torch.Tensor, damp: float = 0.01, act_order: bool = True
) -> Prepared:
    """Dead columns (H_cc == 0) zeroed with H_cc = 1, the column order, and the factor U."""
    perm, upper, dead = _factor(hessian, damp, act_order)
    return Prepared(_live_columns(weight, dead), perm, upper)


def _live_columns(weight: torch.Tensor, dead: torch.Tensor) -> torch.Tensor:
    """An fp32 copy of `weight` with the dead columns zeroed."""
    w = weight.detach().to(torch.float32, copy=True)
    w[:, dead] = 0.0
    return w


def column_importance(prepared: Prepared, power: float = 4.0) -> torch.Tensor:
    """ω_c = U_cc^(-power) per column, in original column order, scaled to mean 1 (only relative
    weights matter; it keeps fp32 sane)."""
    return _importance(prepared.perm, prepared.upper, power)


def _importance(perm: torch.Tensor, upper: torch.Tensor, power: float) -> torch.Tensor:
    importance = torch.empty_like(upper.diagonal())
    importance[perm] = upper.diagonal().pow(-power)
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
    tables = torch.empty(d_out, gpr, 1 << bits, dtype=weight.dtype, device=weight.device)
    for g in range(gpr):  # one group's (1, group) weights broadcast over the rows: no copies
        columns = slice(g * group, (g + 1) * group)
        tables[:, g] = KMEANS[kmeans](weight[:, columns], importance[None, columns], 1 << bits)
    return tables


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
    perm = prepared.perm.tolist()
    group_perm = group_of.to(w_perm.device)[prepared.perm]
    codes = torch.empty(w_perm.shape, dtype=torch.int64, device=w_perm.device)
    row_loss = torch.zeros(w_perm.shape[0], dtype=w_perm.dtype, device=w_perm.device)
    code_batch = _code_batch_cpu if w_perm.is_cpu else _code_batch_torch
    for start in range(0, d_in, column_batch):
        end = min(start + column_batch, d_in)
        batch_codes, errors = code_batch(
            w_perm[:, start:end], tables, group_perm[start:end], upper[start:end, start:end]
        )
        codes[:, perm[start:end]] = batch_codes  # straight to original order
        row_loss += errors.pow(2).sum(dim=1) / 2
        w_perm[:, end:].addmm_(errors, upper[start:end, end:], alpha=-1)  # no product temporary
    return codes, row_loss


def _code_batch_torch(
    batch: torch.Tensor, tables: torch.Tensor, groups: torch.Tensor, u_batch: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch of columns, each coded and its error pushed onto the batch's later columns:
    batch (d_out, B) (overwritten), tables (d_out, n_groups, K), groups (B,), u_batch (B, B).
    Returns codes (d_out, B) int64 and the scaled errors (d_out, B). Any device."""
    codes = torch.empty(batch.shape, dtype=torch.int64, device=batch.device)
    errors = torch.empty_like(batch)
    for i, group in enumerate(groups.tolist()):
        table = tables[:, group, :]  # (d_out, K)
        code = nearest_code(batch[:, i], table)
        codes[:, i] = code
        err = (batch[:, i] - table.gather(1, code[:, None]).squeeze(1)) / u_batch[i, i]
        batch[:, i + 1 :] -= err[:, None] * u_batch[i, i + 1 :][None, :]
        errors[:, i] = err
    return codes, errors


def _code_batch_cpu(
    batch: torch.Tensor, tables: torch.Tensor, groups: torch.Tensor, u_batch: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """`_code_batch_torch` compiled, one row at a time (rows are independent given U) over all
    cores: the same operations in the same order, so the same bits, without ~10 tensor ops per
    column, which dominated at large d_in (a 2048 x 8192 projection: 4x less time). `batch` may
    be overwritten, as there."""
    work = batch.contiguous().numpy()
    codes = np.empty(work.shape, dtype=np.int64)
    errors = np.empty_like(work)
    _code_rows(work, tables.contiguous().numpy(), groups.numpy(), u_batch.contiguous().numpy(),
               codes, errors)
    return torch.from_numpy(codes), torch.from_numpy(errors)


@numba.njit(cache=True, parallel=True)
def _code_rows(work, tables, groups, u, codes, errors):
    rows, width = work.shape
    k = tables.shape[2]
    for r in numba.prange(rows):
        for i in range(width):
            table = tables[r, groups[i]]
            w = work[r, i]
            best, dist = 0, abs(w - table[0])
            for c in range(1, k):  # the first nearest entry, as argmin takes it
                d = abs(w - table[c])
                if d < dist:
                    best, dist = c, d
            codes[r, i] = best
            err = (w - table[best]) / u[i, i]
            errors[r, i] = err
            for j in range(i + 1, width):
                work[r, j] -= err * u[i, j]


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
    k-means with nearest-centroid codes.

    With a Hessian the factor is computed once and the rows go through both steps in chunks of
    about `CHUNK_WEIGHTS` weights (rows are independent given the factor): the workspaces are a
    chunk's, not the layer's."""
    d_out, d_in = weight.shape
    if hessian is None:
        w = weight.detach().float()
        tables = fit_tables(w, None, bits, gpr, kmeans)
        grouped = w.reshape(d_out, gpr, d_in // gpr, 1)
        codes = (grouped - tables[:, :, None, :]).abs().argmin(-1).reshape(d_out, d_in)
        return LayerSketch(codes.to(torch.uint8), tables, None)
    perm, upper, dead = _factor(hessian, damp, act_order)
    importance = _importance(perm, upper, importance_power)
    group_of = torch.arange(d_in, device=upper.device) // (d_in // gpr)
    codes = torch.empty(d_out, d_in, dtype=torch.uint8, device=weight.device)
    values = torch.empty(d_out, gpr, 1 << bits, dtype=torch.float32, device=weight.device)
    row_loss = torch.empty(d_out, dtype=torch.float32, device=weight.device)
    for chunk in _row_chunks(d_out, d_in):
        w = _live_columns(weight[chunk], dead)
        values[chunk] = fit_tables(w, importance, bits, gpr, kmeans)
        codes[chunk], row_loss[chunk] = assign_codes(
            Prepared(w, perm, upper), values[chunk], group_of, column_batch
        )
    return LayerSketch(codes, values, row_loss)


def _row_chunks(d_out: int, d_in: int) -> list[slice]:
    """learn_sketch's row chunks: see CHUNK_WEIGHTS and ROW_BLOCK."""
    rows = max(1, CHUNK_WEIGHTS // d_in // ROW_BLOCK) * ROW_BLOCK
    starts = list(range(0, d_out, rows))
    if len(starts) > 1 and d_out - starts[-1] < ROW_BLOCK:
        starts.pop()
    return [slice(a, b) for a, b in zip(starts, [*starts[1:], d_out], strict=True)]
