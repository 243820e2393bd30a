"""Values gradient: dvalues[r, g, k] = Σ dŴ[r, c] over the columns c of group g with code k.

dŴ = dYᵀ X is never formed for the whole layer: each program computes one (BLOCK_R, BLOCK_C)
tile of it with tl.dot over the tokens (fp32 accumulation), bins the tile by code in registers,
one code at a time (a one-hot reduction), and adds the (BLOCK_R, 2**bits) bins of every group the
tile touches into the fp32 output atomically. Summation order varies between runs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import launch
from .tiles import load_codes, sum_over


@triton.jit
def _lut_values_grad_kernel(
    dy_ptr, x_ptr, codes_ptr, out_ptr,
    tokens, d_out, d_in, group_size, gpr, stride_dy, stride_x,
    BITS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_T: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    c0 = tl.program_id(1) * BLOCK_C
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = c0 + tl.arange(0, BLOCK_C)
    r_ok, c_ok = r < d_out, c < d_in
    acc = tl.full((BLOCK_R, BLOCK_C), 0.0, tl.float32)  # the dŴ tile
    for t0 in range(0, tokens, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        t_ok = (t < tokens)[:, None]
        dy = tl.load(dy_ptr + t[:, None].to(tl.int64) * stride_dy + r[None, :],
                     mask=t_ok & r_ok[None, :], other=0.0)  # (BLOCK_T, BLOCK_R)
        x = tl.load(x_ptr + t[:, None].to(tl.int64) * stride_x + c[None, :],
                    mask=t_ok & c_ok[None, :], other=0.0)  # (BLOCK_T, BLOCK_C)
        acc = tl.dot(tl.trans(dy.to(DOT_DTYPE)), x.to(DOT_DTYPE), acc, input_precision=PRECISION)
    codes = load_codes(codes_ptr, r, r_ok, c0, d_in, BITS, BLOCK_R, BLOCK_C)  # (BLOCK_R, BLOCK_C)
    column_group = (c // group_size)[None, :]
    k = tl.arange(0, 1 << BITS)[None, :]
    last = tl.minimum(c0 + BLOCK_C, d_in) - 1
    for g in range(c0 // group_size, last // group_size + 1):
        in_group = column_group == g
        bins = tl.full((BLOCK_R, 1 << BITS), 0.0, tl.float32)
        for code in tl.static_range(1 << BITS):
            hits = sum_over(tl.where(in_group & (codes == code), acc, 0.0), 1)  # (BLOCK_R,)
            bins += tl.where(k == code, hits[:, None], 0.0)
        ptr = out_ptr + ((r[:, None] * gpr + g) << BITS) + k
        tl.atomic_add(ptr, bins, mask=r_ok[:, None])


def lut_values_grad(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    codes: torch.Tensor,
    values: torch.Tensor,
    bits: int,
    *,
    block_r: int = 64,
    block_c: int = 128,
    block_t: int = 32,
    num_warps: int = 8,
    num_stages: int = 3,
) -> torch.Tensor:
    """grad_out (..., d_out), x (..., d_in), packed codes (d_out, d_in * bits // 8), values
    (d_out, gpr, 2**bits) -> dvalues (d_out, gpr, 2**bits) in values' dtype."""
    d_out, d_in = grad_out.shape[-1], x.shape[-1]
    launch.check_sketch(codes, values, bits, d_in)
    launch.check_activations(grad_out, x)
    if codes.shape[0] != d_out:
        raise ValueError(f"grad_out has {d_out} columns, the sketch {codes.shape[0]} rows")
    g, x2 = launch.as_rows(grad_out, d_out), launch.as_rows(x, d_in)
    if g.shape[0] != x2.shape[0]:
        raise ValueError(f"grad_out has {g.shape[0]} rows, x {x2.shape[0]}")
    for name, size in (("block_r", block_r), ("block_c", block_c), ("block_t", block_t)):
        launch.check_block(name, size)
    gpr = values.shape[1]
    out = torch.zeros(values.shape, device=values.device, dtype=torch.float32)
    if g.shape[0]:
        _lut_values_grad_kernel[(launch.cdiv(d_out, block_r), launch.cdiv(d_in, block_c))](
            g, x2, codes.contiguous(), out,
            g.shape[0], d_out, d_in, d_in // gpr, gpr, g.stride(0), x2.stride(0),
            BITS=bits, BLOCK_R=block_r, BLOCK_C=block_c, BLOCK_T=block_t,
            DOT_DTYPE=launch.dot_dtype(torch.promote_types(g.dtype, x2.dtype), g.device),
            PRECISION=launch.dot_precision(), num_warps=num_warps, num_stages=num_stages,
        )
    return out.to(values.dtype)
