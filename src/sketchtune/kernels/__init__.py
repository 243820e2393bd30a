"""LUT matmul kernels behind one entry point.

`lut_linear(x, codes, values, bits)` computes y = x Ŵᵀ for a sketched weight stored as packed
codes. On CPU tensors it runs the C++ op `sketchtune::lut_linear` (built on first use, see
`kernels.cpu`); on CUDA tensors, when triton is installed, the Triton kernels (`kernels.triton`,
the same op's CUDA kernels); elsewhere, or if those cannot run, the reference PyTorch path.
`compute_path` is the one switch between them (and between the CPU instruction sets).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch.utils.weak import WeakTensorKeyDictionary

from ..errors import SketchtuneError
from ..format import unpack_codes
from . import cpu, reference
from . import triton as gpu

CPU_ISAS = ("avx512", "avx2", "emu16", "scalar")
PATHS = ("best", "reference", *CPU_ISAS)
_path = "best"  # the compute path; set at import from $SKETCHTUNE_KERNELS, below
_unpacked = WeakTensorKeyDictionary()  # packed codes -> (version, unpacked codes)


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


def lut_linear(
    x: torch.Tensor, codes: torch.Tensor, values: torch.Tensor, bits: int | None = None
) -> torch.Tensor:
    """x (..., d_in), values (d_out, gpr, K) -> (..., d_out).

    With `bits`, `codes` are the packed (d_out, d_in * bits // 8) uint8 of the sketch format;
    without, unpacked (d_out, d_in) codes, which only the reference path takes. Under autocast x
    is cast to autocast's dtype first, as for a dense linear layer; the tables stay as they are.
    """
    device = "cpu" if x.is_cpu else x.device.type  # is_cpu first: decode asks ~200 times a token
    if x.is_floating_point() and torch.is_autocast_enabled(device):
        x = x.to(torch.get_autocast_dtype(device))
    if bits is None:
        return _LutLinear.apply(x, codes, values)
    if _fast_cpu(x, codes):
        return torch.ops.sketchtune.lut_linear.default(x, codes, values, bits)
    if _fast_gpu(x, codes, values):
        return gpu.lut_linear(x, codes, values, bits)
    return _LutLinear.apply(x, unpacked(codes, bits, x.shape[-1]), values)


def bf16_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x (..., d_in) @ weightᵀ for a dense bf16 weight (d_out, d_in), in x's dtype. On CPU the C++
    GEMV reads the weight as stored and computes in fp32; elsewhere x is rounded to bf16."""
    if _fast_cpu(x, weight):
        return torch.ops.sketchtune.bf16_linear.default(x, weight)
    return F.linear(x.to(torch.bfloat16), weight).to(x.dtype)


def _fast_cpu(x: torch.Tensor, codes: torch.Tensor) -> bool:
    # is_cpu, not device.type: a decode step asks this some 200 times per token
    return (
        _path != "reference"
        and x.is_cpu
        and codes.is_cpu
        and x.dtype in cpu.FAST_DTYPES
        and cpu.available()
    )


def _fast_gpu(x: torch.Tensor, codes: torch.Tensor, values: torch.Tensor) -> bool:
    return (
        _path != "reference"
        and x.is_cuda
        and codes.is_cuda
        and values.is_cuda
        and x.dtype in gpu.FAST_DTYPES
        and gpu.available()
    )


def unpacked(codes: torch.Tensor, bits: int, d_in: int) -> torch.Tensor:
    """Unpacked codes for the reference path, kept while the packed tensor is unchanged."""
    if torch.compiler.is_compiling():
        return unpack_codes(codes, bits, d_in)
    hit = _unpacked.get(codes)
    if hit is None or hit[0] != codes._version:
        hit = (codes._version, unpack_codes(codes, bits, d_in))
        _unpacked[codes] = hit
    return hit[1]


def set_compute_path(name: str) -> None:
    """Where every lut_linear runs from now on: "best" (the fastest kernels on each device, the
    default), "reference" (the PyTorch oracle on any device; nothing is built) or one CPU
    instruction set of `CPU_ISAS` (RuntimeError where it cannot run; CUDA keeps its kernels)."""
    global _path
    if name not in PATHS:
        raise SketchtuneError(f"compute path {name!r}: expected one of {', '.join(PATHS)}")
    if name != "reference" and cpu.available():
        cpu.isa(name)
    _path = name


def runnable_cpu_isas() -> list[str]:
    """The instruction sets of `CPU_ISAS` this CPU runs (none where the kernels are unavailable);
    the one in use stays."""
    if not cpu.available():
        return []
    current, found = cpu.isa(), []
    for name in CPU_ISAS:
        try:
            cpu.isa(name)
            found.append(name)
        except RuntimeError:
            pass
    cpu.isa(current)
    return found


def current_path() -> str:
    """"reference" while that path runs (or the CPU kernels are unavailable), else the CPU
    instruction set in use."""
    return cpu.isa() if _path != "reference" and cpu.available() else "reference"


@contextmanager
def compute_path(name: str) -> Iterator[None]:
    """`set_compute_path(name)` inside the block, the previous path after it (tests, benchmarks)."""
    previous = _path
    set_compute_path(name)
    try:
        yield
    finally:
        set_compute_path(previous)


_path = os.environ.get("SKETCHTUNE_KERNELS", "best")  # "reference": start without the kernels
if _path not in PATHS:
    raise SketchtuneError(f"SKETCHTUNE_KERNELS={_path!r}: expected one of {', '.join(PATHS)}")
