"""How well a rank-r product and a sketch approximate one weight update ΔW (d_out, d_in).

Every error is relative: ||ΔW - approx|| / ||ΔW||, either in Frobenius norm or weighted by the
layer's input Hessian H (d_in, d_in), i.e. sqrt(trace(E H Eᵀ) / trace(ΔW H ΔWᵀ)), the share of the
update's effect on the layer outputs that the approximation misses.

- rank-r: the truncated SVD of ΔW (optimal in Frobenius norm). Under H the optimum differs: the
  whitened truncation, whose error is the tail of the spectrum of ΔW H ΔWᵀ ("rank_h_opt").
- frozen codes: the sketch's codes stay as they are and only its values change; per (row, group,
  code) bin the least-squares optimum is the mean of ΔW over the bin.
- free codes: a sketch learned for ΔW itself, exact 1-D k-means per (row, group).
"""

from __future__ import annotations

import math

import torch

from ..kmeans import exact_kmeans_1d

# (sketch error, low-rank error it is compared with) -> what the pair means
COMPARISONS = {
    ("frozen", "rank"): "frozen codes vs rank-r (Frobenius)",
    ("free", "rank"): "free codes vs rank-r (Frobenius)",
    ("frozen_h", "rank_h"): "frozen codes vs rank-r (Hessian-weighted)",
    ("free_h", "rank_h"): "free codes vs rank-r (Hessian-weighted)",
    ("frozen_h", "rank_h_opt"): "frozen codes vs H-optimal rank-r (Hessian-weighted)",
    ("free_h", "rank_h_opt"): "free codes vs H-optimal rank-r (Hessian-weighted)",
}


def sketch_params(d_out: int, bits: int, gpr: int) -> int:
    """Trainable values of a sketched layer: one table of 2**bits per (row, group)."""
    return d_out * gpr * (1 << bits)


def rank_for_budget(d_out: int, d_in: int, params: int) -> int:
    """The largest rank whose factors (d_out + d_in) * r fit in `params`."""
    return min(params // (d_out + d_in), d_out, d_in)


def h_energy(matrix: torch.Tensor, hessian: torch.Tensor) -> float:
    """trace(M H Mᵀ) for M (m, d_in)."""
    m = matrix.to(hessian.dtype)
    return float(((m @ hessian) * m).sum())


def relative_error(
    delta: torch.Tensor, approx: torch.Tensor, hessian: torch.Tensor | None = None,
    reference: float | None = None,
) -> float:
    """||ΔW - approx|| / ||ΔW||, in Frobenius norm or, given H, in the H-weighted norm.

    `reference`, when given, is the squared norm of ΔW in the same norm (saves recomputing it).
    """
    error = delta.double() - approx.double()
    if hessian is None:
        num = float(error.square().sum())
        den = reference if reference is not None else float(delta.double().square().sum())
    else:
        num = h_energy(error, hessian)
        den = reference if reference is not None else h_energy(delta, hessian)
    return math.sqrt(max(num, 0.0) / den) if den > 0 else 0.0


def _gram_eigh(delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Eigenpairs (ascending) of the smaller Gram matrix of ΔW (float64), and whether ΔW is tall
    (d_out >= d_in: then the eigenvectors are its right singular vectors, else its left ones)."""
    d = delta.double()
    tall = d.shape[0] >= d.shape[1]
    values, vectors = torch.linalg.eigh(d.T @ d if tall else d @ d.T)
    return values.clamp_min(0), vectors, tall


def _truncate(delta: torch.Tensor, vectors: torch.Tensor, tall: bool, rank: int) -> torch.Tensor:
    d = delta.double()
    top = vectors[:, vectors.shape[1] - rank :]  # eigenvectors of the `rank` largest eigenvalues
    return (d @ top) @ top.T if tall else top @ (top.T @ d)


def truncated_svd(delta: torch.Tensor, rank: int) -> torch.Tensor:
    """Best rank-r approximation of ΔW in Frobenius norm (float64)."""
    _, vectors, tall = _gram_eigh(delta)
    return _truncate(delta, vectors, tall, rank)


def _tail_share(spectrum: torch.Tensor, rank: int) -> float:
    """sqrt(sum of all but the `rank` largest of an ascending spectrum / sum of all of it)."""
    spectrum = spectrum.clamp_min(0)
    total = float(spectrum.sum())
    tail = float(spectrum[: max(spectrum.numel() - rank, 0)].sum())
    return math.sqrt(tail / total) if total > 0 else 0.0


def rank_errors(delta: torch.Tensor, rank: int, hessian: torch.Tensor | None) -> dict[str, float]:
    """Rank-r errors: Frobenius ("rank"); with H also the same truncation under H ("rank_h") and
    the H-optimal rank-r ("rank_h_opt": the tail of the spectrum of ΔW H ΔWᵀ)."""
    values, vectors, tall = _gram_eigh(delta)
    approx = _truncate(delta, vectors, tall, rank)
    out = {"rank": relative_error(delta, approx)}
    if hessian is None:
        return out
    out["rank_h"] = relative_error(delta, approx, hessian)
    # Products in H's precision (fp32 from calibration), eigenvalues in fp64.
    if tall:  # ΔW = U S Vᵀ: ΔW H ΔWᵀ has the nonzero spectrum of (V S)ᵀ H (V S), d_in wide
        factor = (vectors * values.sqrt()).to(hessian.dtype)
        product = factor.T @ hessian @ factor
    else:
        d = delta.to(hessian.dtype)
        product = d @ hessian @ d.T
    out["rank_h_opt"] = _tail_share(torch.linalg.eigvalsh(product.double()), rank)
    return out


def frozen_codes_approx(
    delta: torch.Tensor, codes: torch.Tensor, gpr: int, bits: int
) -> torch.Tensor:
    """The values-only update closest to ΔW: each (row, group, code) bin takes the mean of ΔW."""
    rows, d_in = delta.shape
    n_codes = 1 << bits
    group_of = torch.arange(d_in, device=delta.device) // (d_in // gpr)
    bins = group_of * n_codes + codes.long()  # (rows, d_in), bin index inside the row
    d = delta.double()
    sums = torch.zeros(rows, gpr * n_codes, dtype=d.dtype).scatter_add_(1, bins, d)
    counts = torch.zeros_like(sums).scatter_add_(1, bins, torch.ones_like(d))
    means = sums / counts.clamp_min(1)
    return means.gather(1, bins)


def free_codes_approx(delta: torch.Tensor, gpr: int, bits: int) -> torch.Tensor:
    """A sketch of ΔW itself: per (row, group) exact k-means, each entry its nearest centroid."""
    rows, d_in = delta.shape
    points = delta.double().reshape(rows * gpr, d_in // gpr)
    centroids = exact_kmeans_1d(points, torch.ones(1, 1, dtype=points.dtype), 1 << bits)
    midpoints = (centroids[:, 1:] + centroids[:, :-1]) / 2  # centroids come sorted
    nearest = torch.searchsorted(midpoints.contiguous(), points.contiguous())
    return centroids.gather(1, nearest).reshape(rows, d_in)


def sketch_errors(
    delta: torch.Tensor, codes: torch.Tensor, hessian: torch.Tensor | None, bits: int, gpr: int
) -> dict[str, float]:
    """Frozen- and free-codes errors of the rows given (ΔW rows and the base sketch's codes)."""
    approxes = {
        "frozen": frozen_codes_approx(delta, codes, gpr, bits),
        "free": free_codes_approx(delta, gpr, bits),
    }
    out = {name: relative_error(delta, a) for name, a in approxes.items()}
    if hessian is not None:
        reference = h_energy(delta, hessian)
        for name, approx in approxes.items():
            out[f"{name}_h"] = relative_error(delta, approx, hessian, reference)
    return out
