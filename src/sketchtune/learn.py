"""Learning one layer's sketch from its weight W (d_out, d_in) and input Hessian H (d_in, d_in).

Data-aware path (DESIGN section 1): damp H, order columns by descending diag(H), derive column
importances from the upper Cholesky factor of H⁻¹, fit each (row, group) table by
importance-weighted 1-D k-means (exact by default, see kmeans.py), then pick codes column by column
while pushing each rounding error onto the columns not yet coded (GPTQ-style error
compensation). The plain path (no H) is per-row k-means only.
"""

from __future__ import annotations

from typing import Literal

import torch

from .kmeans import exact_kmeans_1d, lloyd_kmeans_1d

KMEANS = {"exact": exact_kmeans_1d, "lloyd": lloyd_kmeans_1d}


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


def learn_sketch(
    weight: torch.Tensor,
    hessian: torch.Tensor | None,
    bits: int = 4,
    gpr: int = 4,
    damp: float = 0.01,
    importance_power: float = 4.0,
    act_order: bool = True,
    block_size: int = 128,
    kmeans: Literal["exact", "lloyd"] = "exact",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (codes (d_out, d_in) uint8, values (d_out, gpr, 2**bits) fp32).

    With `hessian=None` this is plain per-(row, group) k-means with nearest-centroid codes.
    """
    d_out, d_in = weight.shape
    group = d_in // gpr
    n_codes = 1 << bits
    w = weight.detach().float().clone()

    if hessian is None:
        tables = KMEANS[kmeans](
            w.reshape(-1, group), torch.ones(1, group, device=w.device), n_codes
        ).reshape(d_out, gpr, n_codes)
        grouped = w.reshape(d_out, gpr, group, 1)
        codes = (grouped - tables[:, :, None, :]).abs().argmin(-1).reshape(d_out, d_in)
        return codes.to(torch.uint8), tables

    h = hessian.detach().float().clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0

    perm = (
        torch.argsort(h.diagonal(), descending=True)
        if act_order
        else torch.arange(d_in, device=w.device)
    )
    upper = inverse_hessian_factor(h[perm][:, perm], damp)

    importance = torch.empty(d_in, device=w.device)
    importance[perm] = upper.diagonal().pow(-importance_power)
    importance = importance / importance.mean()  # only relative weights matter; keeps fp32 sane
    tables = KMEANS[kmeans](
        w.reshape(-1, group),
        importance.reshape(1, gpr, group).expand(d_out, gpr, group).reshape(-1, group),
        n_codes,
    ).reshape(d_out, gpr, n_codes)

    w_perm = w[:, perm]
    group_of = perm // group  # group of each permuted column, in original order
    codes_perm = torch.empty(d_out, d_in, dtype=torch.int64, device=w.device)
    for start in range(0, d_in, block_size):
        end = min(start + block_size, d_in)
        block = w_perm[:, start:end].clone()
        errors = torch.empty_like(block)
        u_block = upper[start:end, start:end]
        for i in range(end - start):
            table = tables[:, group_of[start + i], :]  # (d_out, K)
            code = nearest_code(block[:, i], table)
            codes_perm[:, start + i] = code
            err = (block[:, i] - table.gather(1, code[:, None]).squeeze(1)) / u_block[i, i]
            block[:, i + 1 :] -= err[:, None] * u_block[i, i + 1 :][None, :]
            errors[:, i] = err
        w_perm[:, end:] -= errors @ upper[start:end, end:]

    codes = torch.empty_like(codes_perm)
    codes[:, perm] = codes_perm
    return codes.to(torch.uint8), tables
