"""The sketchtune ops on Triton, wired into torch.

When the C++ extension is loaded (it defines the op schemas and their autograd, kernels/cpu), the
launchers become the CUDA kernels of `sketchtune::lut_linear` and its two gradient ops, so CUDA
tensors get the same op, autograd (the C++ Autograd kernel calls the gradient ops through the
dispatcher) and torch.compile support as CPU ones. Without it, a torch.autograd.Function calls the
launchers directly.
"""

from __future__ import annotations

import torch

from .. import cpu
from .gemm import lut_gemm
from .gemv import MAX_ROWS, lut_gemv
from .input_grad import lut_input_grad
from .values_grad import lut_values_grad

_library: torch.library.Library | None = None


def lut_linear_forward(
    x: torch.Tensor, codes: torch.Tensor, values: torch.Tensor, bits: int
) -> torch.Tensor:
    """y = x Ŵᵀ: the LUT GEMV up to MAX_ROWS rows of x, the fused dequantize + GEMM beyond."""
    rows = x.numel() // max(x.shape[-1], 1)
    if rows <= MAX_ROWS:
        return lut_gemv(x, codes, values, bits)
    return lut_gemm(x, codes, values, bits)


def register() -> bool:
    """Register the launchers as the CUDA kernels of the sketchtune ops (once). False when the
    C++ extension, which defines the ops, is unavailable."""
    global _library
    if _library is None:
        if not cpu.available():
            return False
        library = torch.library.Library("sketchtune", "IMPL")
        library.impl("lut_linear", lut_linear_forward, "CUDA")
        library.impl("lut_linear_input_grad", lut_input_grad, "CUDA")
        library.impl("lut_linear_values_grad", lut_values_grad, "CUDA")
        _library = library
    return True


class LutLinearFunction(torch.autograd.Function):
    """y = x Ŵᵀ with both gradients on the Triton launchers, for when the ops are not defined."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, codes: torch.Tensor, values: torch.Tensor, bits: int):
        ctx.save_for_backward(x, codes, values)
        ctx.bits = bits
        return lut_linear_forward(x, codes, values, bits)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, codes, values = ctx.saved_tensors
        grad_x = grad_values = None
        if ctx.needs_input_grad[0]:
            grad_x = lut_input_grad(grad_out, codes, values, ctx.bits)
        if ctx.needs_input_grad[2]:
            grad_values = lut_values_grad(grad_out, x, codes, values, ctx.bits)
        return grad_x, None, grad_values, None


def lut_linear(
    x: torch.Tensor, codes: torch.Tensor, values: torch.Tensor, bits: int
) -> torch.Tensor:
    """x (..., d_in), packed codes, values (d_out, gpr, 2**bits) -> (..., d_out), with autograd:
    through the registered op when possible, else through LutLinearFunction."""
    if register():
        return torch.ops.sketchtune.lut_linear.default(x, codes, values, bits)
    return LutLinearFunction.apply(x, codes, values, bits)
