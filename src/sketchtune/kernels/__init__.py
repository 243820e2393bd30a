"""LUT matmul kernels behind one autograd op.

`lut_linear(x, codes, values)` computes y = x Ŵᵀ for a sketched weight. Only the reference
PyTorch path exists so far; device-specific kernels plug in here without touching the layers.
"""

from __future__ import annotations

import torch

from . import reference


class _LutLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, codes: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, codes, values)
        return reference.lut_linear_forward(x, codes, values)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, codes, values = ctx.saved_tensors
        grad_x = grad_values = None
        if ctx.needs_input_grad[0]:
            grad_x = reference.lut_linear_input_grad(grad_out, codes, values)
        if ctx.needs_input_grad[2]:
            grad_values = reference.lut_linear_values_grad(grad_out, x, codes, values)
            grad_values = grad_values.to(values.dtype)
        return grad_x, None, grad_values


def lut_linear(x: torch.Tensor, codes: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """x (..., d_in), unpacked codes (d_out, d_in) uint8, values (d_out, gpr, K) -> (..., d_out)."""
    return _LutLinear.apply(x, codes, values)
