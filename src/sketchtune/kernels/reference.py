"""Plain PyTorch LUT matmul: the oracle that every fast kernel is tested against.

Shapes: x (..., d_in), codes (d_out, d_in) unpacked uint8, values (d_out, gpr, K).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..format import dequantize


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for every lower precision; float64 stays float64 (gradcheck)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def lut_linear_forward(x: torch.Tensor, codes: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """y = x Ŵᵀ with Ŵ rebuilt from the tables. (..., d_in) -> (..., d_out)."""
    return F.linear(x, dequantize(codes, values.to(x.dtype)))


def lut_linear_input_grad(
    grad_out: torch.Tensor, codes: torch.Tensor, values: torch.Tensor
) -> torch.Tensor:
    """dX = dY Ŵ. (..., d_out) -> (..., d_in)."""
    return grad_out @ dequantize(codes, values.to(grad_out.dtype))


def lut_linear_values_grad(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    codes: torch.Tensor,
    values: torch.Tensor,
    weight_grad_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """dvalues[r, g, k] = sum of dŴ[r, c] over the columns c of group g whose code is k.

    dŴ = dYᵀ X is formed in the accumulation dtype (fp32 at least); `weight_grad_dtype` rounds it
    to that dtype before the bins, as a GEMM with outputs in that dtype returns it (the CPU
    kernels' bf16 GEMM). Returns (d_out, gpr, K).
    """
    d_out, d_in = codes.shape
    gpr, n_codes = values.shape[1], values.shape[2]
    acc = accumulation_dtype(torch.promote_types(grad_out.dtype, x.dtype))
    grad_w = grad_out.reshape(-1, d_out).to(acc).T @ x.reshape(-1, d_in).to(acc)  # (d_out, d_in)
    if weight_grad_dtype is not None:
        grad_w = grad_w.to(weight_grad_dtype).to(acc)
    bins = torch.zeros(d_out, gpr, n_codes, dtype=acc, device=x.device)
    index = codes.reshape(d_out, gpr, d_in // gpr).to(torch.int64)
    return bins.scatter_add_(2, index, grad_w.reshape(d_out, gpr, d_in // gpr))
