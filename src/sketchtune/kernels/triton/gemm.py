"""Prefill and training forward: y = x Ŵᵀ, each Ŵ tile dequantized in registers, then tl.dot.

Tiles of y (BLOCK_M x BLOCK_N) in grouped order; along d_in, every step loads an activation tile,
rebuilds the matching (BLOCK_N, BLOCK_K) tile of Ŵ from codes and tables in the operand dtype
(bf16/fp16 on tensor cores, fp32 as torch would) and accumulates in fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import launch
from .tiles import dequantize, grouped_tile


@triton.jit
def _lut_gemm_kernel(
    x_ptr, codes_ptr, values_ptr, y_ptr,
    rows, d_out, d_in, group_size, gpr, stride_x, stride_y,
    BITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    tile_m, tile_n = grouped_tile(tl.program_id(0), rows, d_out, BLOCK_M, BLOCK_N, GROUP_M)
    m = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok, n_ok = m < rows, n < d_out
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for k0 in range(0, d_in, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + m[:, None].to(tl.int64) * stride_x + k[None, :],
                    mask=m_ok[:, None] & (k < d_in)[None, :], other=0.0)  # (BLOCK_M, BLOCK_K)
        w = dequantize(codes_ptr, values_ptr, n, n_ok, k0, d_in, group_size, gpr,
                       BITS, BLOCK_N, BLOCK_K)  # (BLOCK_N, BLOCK_K)
        acc = tl.dot(x.to(DOT_DTYPE), tl.trans(w.to(DOT_DTYPE)), acc, input_precision=PRECISION)
    ptr = y_ptr + m[:, None].to(tl.int64) * stride_y + n[None, :]
    tl.store(ptr, acc, mask=m_ok[:, None] & n_ok[None, :])


def lut_gemm(
    x: torch.Tensor,
    codes: torch.Tensor,
    values: torch.Tensor,
    bits: int,
    *,
    block_m: int | None = None,
    block_n: int = 128,
    block_k: int = 32,
    group_m: int = 8,
    num_warps: int | None = None,
    num_stages: int = 3,
) -> torch.Tensor:
    """x (..., d_in), packed codes (d_out, d_in * bits // 8), values (d_out, gpr, 2**bits)
    -> y (..., d_out) in x's dtype. block_m defaults to 128, less for fewer rows.

    The default tiles hold 212 registers a thread at 8 warps on sm_90 (ptxas, no spills);
    wider ones spill: the dequantized tile and its gather addresses live in registers."""
    d_in = x.shape[-1]
    launch.check_sketch(codes, values, bits, d_in)
    launch.check_activations(x)
    x2 = launch.as_rows(x, d_in)
    rows, d_out = x2.shape[0], codes.shape[0]
    y = torch.empty(rows, d_out, device=x.device, dtype=x.dtype)
    if rows:
        block_m = block_m or min(128, max(16, triton.next_power_of_2(rows)))
        for name, size in (("block_m", block_m), ("block_n", block_n), ("block_k", block_k)):
            launch.check_block(name, size)
        _lut_gemm_kernel[(launch.cdiv(rows, block_m) * launch.cdiv(d_out, block_n),)](
            x2, codes.contiguous(), launch.tables(values), y,
            rows, d_out, d_in, d_in // values.shape[1], values.shape[1], x2.stride(0),
            y.stride(0),
            BITS=bits, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=group_m,
            DOT_DTYPE=launch.dot_dtype(x.dtype, x.device), PRECISION=launch.dot_precision(),
            num_warps=num_warps or (8 if block_m * block_n >= 128 * 128 else 4),
            num_stages=num_stages,
        )
    return y.reshape(*x.shape[:-1], d_out)
