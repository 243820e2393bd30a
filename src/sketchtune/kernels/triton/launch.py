"""Host-side helpers for the launchers: argument checks, row views, dtypes for tl.dot."""

from __future__ import annotations

import torch
import triton.language as tl

from ...format import SUPPORTED_BITS
from . import FAST_DTYPES

_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def check_sketch(codes: torch.Tensor, values: torch.Tensor, bits: int, d_in: int) -> None:
    """Raise ValueError unless packed codes and tables describe a (d_out, d_in) sketch."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"sketchtune: bits must be one of {SUPPORTED_BITS}, got {bits}")
    if codes.dim() != 2 or codes.dtype != torch.uint8 or codes.shape[1] * 8 != d_in * bits:
        raise ValueError(
            f"sketchtune: codes of shape {tuple(codes.shape)} ({codes.dtype}) do not hold "
            f"{d_in} {bits}-bit codes per row"
        )
    if (
        values.dim() != 3
        or values.shape[0] != codes.shape[0]
        or values.shape[2] != 1 << bits
        or values.shape[1] == 0
        or d_in % values.shape[1]
    ):
        raise ValueError(
            f"sketchtune: values of shape {tuple(values.shape)} do not fit codes of shape "
            f"{tuple(codes.shape)} at {bits} bits"
        )


def check_activations(*tensors: torch.Tensor) -> None:
    for t in tensors:
        if t.dtype not in FAST_DTYPES:
            raise ValueError(
                f"sketchtune: Triton kernels take float32, bfloat16 or float16 activations, "
                f"got {t.dtype}"
            )


def as_rows(t: torch.Tensor, width: int) -> torch.Tensor:
    """(..., width) -> (rows, width) with unit column stride (a view when possible)."""
    rows = t.reshape(-1, width)
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def tables(values: torch.Tensor) -> torch.Tensor:
    """The fp32 contiguous (d_out, gpr, 2**bits) tables the kernels read."""
    return values.to(torch.float32).contiguous()


def dot_dtype(dtype: torch.dtype, device: torch.device) -> tl.dtype:
    """Operand type of tl.dot for activations of `dtype` (accumulation is always fp32).

    On CPU tensors the kernels run under the Triton interpreter, whose tl.dot multiplies
    bfloat16 operands as their raw uint16 bits: there the operands are widened to fp32.
    """
    if device.type == "cpu" and dtype == torch.bfloat16:
        return tl.float32
    return _TL_DTYPES[dtype]


def dot_precision() -> str:
    """fp32 tl.dot precision that matches torch's own matmuls (TF32 only where torch allows it)."""
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


def multiprocessors(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; 1 elsewhere (the interpreter)."""
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def check_block(name: str, size: int) -> None:
    """Tile extents are powers of two from 16 (tl.dot's least; a multiple of every packing unit)."""
    if size < 16 or size & (size - 1):
        raise ValueError(f"{name} must be a power of two >= 16, got {size}")


def cdiv(a: int, b: int) -> int:
    return -(-a // b)
