"""Input gradient: dX = dY Ŵ, each Ŵ tile dequantized in registers, then tl.dot.

Tiles of dX (BLOCK_M x BLOCK_K, columns of Ŵ) in grouped order; the reduction runs over the
d_out rows of Ŵ in steps of BLOCK_N, so the codes tile is read as stored, rows by columns.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import launch
from .tiles import dequantize, grouped_tile


@triton.jit
def _lut_input_grad_kernel(
    dy_ptr, codes_ptr, values_ptr, dx_ptr,
    rows, d_out, d_in, group_size, gpr, stride_dy, stride_dx,
    BITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    tile_m, tile_k = grouped_tile(tl.program_id(0), rows, d_in, BLOCK_M, BLOCK_K, GROUP_M)
    m = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    k = tile_k * BLOCK_K + tl.arange(0, BLOCK_K)
    m_ok = m < rows
    acc = tl.full((BLOCK_M, BLOCK_K), 0.0, tl.float32)
    for n0 in range(0, d_out, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_ok = n < d_out
        dy = tl.load(dy_ptr + m[:, None].to(tl.int64) * stride_dy + n[None, :],
                     mask=m_ok[:, None] & n_ok[None, :], other=0.0)  # (BLOCK_M, BLOCK_N)
        w = dequantize(codes_ptr, values_ptr, n, n_ok, tile_k * BLOCK_K, d_in, group_size, gpr,
                       BITS, BLOCK_N, BLOCK_K)  # (BLOCK_N, BLOCK_K)
        acc = tl.dot(dy.to(DOT_DTYPE), w.to(DOT_DTYPE), acc, input_precision=PRECISION)
    ptr = dx_ptr + m[:, None].to(tl.int64) * stride_dx + k[None, :]
    tl.store(ptr, acc, mask=m_ok[:, None] & (k < d_in)[None, :])


def lut_input_grad(
    grad_out: torch.Tensor,
    codes: torch.Tensor,
    values: torch.Tensor,
    bits: int,
    *,
    block_m: int | None = None,
    block_n: int = 32,
    block_k: int = 128,
    group_m: int = 8,
    num_warps: int | None = None,
    num_stages: int = 3,
) -> torch.Tensor:
    """grad_out (..., d_out), packed codes (d_out, d_in * bits // 8), values (d_out, gpr,
    2**bits) -> dX (..., d_in) in grad_out's dtype. block_n is the reduction step over d_out;
    the default tiles hold about 200 registers a thread at 8 warps on sm_90 (no spills)."""
    d_out = grad_out.shape[-1]
    d_in = codes.shape[1] * 8 // bits
    launch.check_sketch(codes, values, bits, d_in)
    launch.check_activations(grad_out)
    if codes.shape[0] != d_out:
        raise ValueError(f"grad_out has {d_out} columns, the sketch {codes.shape[0]} rows")
    g = launch.as_rows(grad_out, d_out)
    rows = g.shape[0]
    dx = torch.empty(rows, d_in, device=g.device, dtype=g.dtype)
    if rows:
        block_m = block_m or min(128, max(16, triton.next_power_of_2(rows)))
        for name, size in (("block_m", block_m), ("block_n", block_n), ("block_k", block_k)):
            launch.check_block(name, size)
        _lut_input_grad_kernel[(launch.cdiv(rows, block_m) * launch.cdiv(d_in, block_k),)](
            g, codes.contiguous(), launch.tables(values), dx,
            rows, d_out, d_in, d_in // values.shape[1], values.shape[1], g.stride(0),
            dx.stride(0),
            BITS=bits, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=group_m,
            DOT_DTYPE=launch.dot_dtype(g.dtype, g.device), PRECISION=launch.dot_precision(),
            num_warps=num_warps or (8 if block_m * block_k >= 128 * 128 else 4),
            num_stages=num_stages,
        )
    return dx.reshape(*grad_out.shape[:-1], d_in)
