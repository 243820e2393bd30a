"""Decode: y = x Ŵᵀ for 1..8 rows of activations, reading packed codes and tables only.

Memory-bound: every program streams the codes of BLOCK_N output rows (bits/8 bytes a weight),
looks each weight up in its (row, group) table and multiplies it into every activation row in
registers. No dense weight is ever written.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import as_rows, cdiv, check_activations, check_block, check_sketch, multiprocessors
from .launch import tables as fp32_tables
from .tiles import dequantize, sum_over

MAX_ROWS = 8


@triton.jit
def _lut_gemv_kernel(
    x_ptr, codes_ptr, values_ptr, y_ptr,
    rows, d_out, d_in, group_size, gpr, stride_x, stride_y, split_cols,
    BITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ATOMIC: tl.constexpr,
):
    # Program (i, s): outputs n in [i * BLOCK_N, +BLOCK_N) over the input columns of split s.
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    m = tl.arange(0, BLOCK_M)
    n_ok, m_ok = n < d_out, m < rows
    start = tl.program_id(1) * split_cols
    # Products accumulate lane by lane; one reduction across the lanes at the end.
    partial = tl.full((BLOCK_M, BLOCK_N, BLOCK_K), 0.0, tl.float32)
    for k0 in range(start, tl.minimum(start + split_cols, d_in), BLOCK_K):
        w = dequantize(codes_ptr, values_ptr, n, n_ok, k0, d_in, group_size, gpr,
                       BITS, BLOCK_N, BLOCK_K)  # (BLOCK_N, BLOCK_K)
        k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + m[:, None] * stride_x + k[None, :],
                    mask=m_ok[:, None] & (k < d_in)[None, :], other=0.0)  # (BLOCK_M, BLOCK_K)
        partial += x.to(tl.float32)[:, None, :] * w[None, :, :]
    acc = sum_over(partial, 2)  # (BLOCK_M, BLOCK_N)
    ptr = y_ptr + m[:, None] * stride_y + n[None, :]
    ok = m_ok[:, None] & n_ok[None, :]
    if ATOMIC:
        tl.atomic_add(ptr, acc, mask=ok)
    else:
        tl.store(ptr, acc, mask=ok)


def gemv_config(rows: int, d_out: int, d_in: int, device: torch.device) -> tuple[int, int, int]:
    """(block_n, block_k, split_k): 2-4K products a step (64-80 registers a thread at 4 warps on
    sm_90), and enough programs to fill the GPU (split_k > 1: partial sums are added
    atomically). A rule of thumb, not yet tuned on hardware (benchmarks/kernels_gpu.py --sweep).
    """
    block_k = min(256 if rows <= 2 else 128, max(16, triton.next_power_of_2(d_in)))
    block_n = 8 if rows <= 4 else 4
    programs, target = cdiv(d_out, block_n), 2 * multiprocessors(device)
    split_k = 1
    while programs * split_k < target and split_k * block_k * 2 <= d_in:
        split_k *= 2
    return block_n, block_k, split_k


def lut_gemv(
    x: torch.Tensor,
    codes: torch.Tensor,
    values: torch.Tensor,
    bits: int,
    *,
    block_n: int | None = None,
    block_k: int | None = None,
    split_k: int | None = None,
    num_warps: int = 4,
) -> torch.Tensor:
    """x (..., d_in) with at most 8 rows, packed codes (d_out, d_in * bits // 8), values
    (d_out, gpr, 2**bits) -> y (..., d_out) in x's dtype. Unset tile sizes follow gemv_config."""
    d_in = x.shape[-1]
    check_sketch(codes, values, bits, d_in)
    check_activations(x)
    x2 = as_rows(x, d_in)
    rows, d_out = x2.shape[0], codes.shape[0]
    if rows > MAX_ROWS:
        raise ValueError(f"lut_gemv takes at most {MAX_ROWS} rows, got {rows}")
    if rows == 0:
        return x.new_empty((*x.shape[:-1], d_out))
    auto_n, auto_k, auto_split = gemv_config(rows, d_out, d_in, x.device)
    block_n, block_k = block_n or auto_n, block_k or auto_k
    check_block("block_k", block_k)
    if block_n & (block_n - 1):
        raise ValueError(f"block_n must be a power of two, got {block_n}")
    k_blocks = cdiv(d_in, block_k)
    split_cols = cdiv(k_blocks, min(split_k or auto_split, k_blocks)) * block_k
    splits = cdiv(d_in, split_cols)
    atomic = splits > 1
    y = (torch.zeros if atomic else torch.empty)(
        rows, d_out, device=x.device, dtype=torch.float32 if atomic else x.dtype
    )
    _lut_gemv_kernel[(cdiv(d_out, block_n), splits)](
        x2, codes.contiguous(), fp32_tables(values), y,
        rows, d_out, d_in, d_in // values.shape[1], values.shape[1], x2.stride(0), y.stride(0),
        split_cols,
        BITS=bits, BLOCK_M=triton.next_power_of_2(rows), BLOCK_N=block_n, BLOCK_K=block_k,
        ATOMIC=atomic, num_warps=num_warps,
    )
    return y.to(x.dtype).reshape(*x.shape[:-1], d_out)
