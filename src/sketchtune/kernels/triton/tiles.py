"""Device helpers shared by the kernels: unpack a tile of codes, look its weights up, order tiles.

Only Triton builtins and our own `@triton.jit` functions are used here and in the kernels (no
`tl.sum`, `tl.zeros`, `tl.cdiv`: those are jitted inside triton and fail under the interpreter
unless TRITON_INTERPRET was set before triton itself was imported, which torch often does first).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def sum_over(x, axis: tl.constexpr):
    """tl.sum of fp32 `x` without its jitted wrapper; the interpreter recognises this combine
    function and sums with numpy (any other runs element by element in Python)."""
    return tl.reduce(x, axis, tl.standard._sum_combine)


@triton.jit
def load_codes(codes_ptr, rows, row_ok, k0, d_in, BITS: tl.constexpr, BLOCK_R: tl.constexpr,
               BLOCK_K: tl.constexpr):
    """Codes of `rows` (BLOCK_R,) at columns k0 .. k0 + BLOCK_K: (BLOCK_R, BLOCK_K) int32.

    Each row is a little-endian bit stream, code c at bit c * BITS (format.py). k0 is a multiple
    of BLOCK_K, itself a multiple of the packing unit; masked rows and columns read code 0.
    """
    row_bytes = d_in * BITS // 8
    if BITS == 3:  # units of 8 codes in 3 bytes
        units = k0 // 8 + tl.arange(0, BLOCK_K // 8)
        ok = row_ok[:, None] & (units[None, :] < d_in // 8)
        ptr = codes_ptr + rows[:, None].to(tl.int64) * row_bytes + units[None, :] * 3
        word = tl.load(ptr, mask=ok, other=0).to(tl.int32)
        word |= tl.load(ptr + 1, mask=ok, other=0).to(tl.int32) << 8
        word |= tl.load(ptr + 2, mask=ok, other=0).to(tl.int32) << 16  # (BLOCK_R, BLOCK_K // 8)
        # Each join appends an axis: code 4a + 2b + c of a unit lands at [a, b, c] (inner join: a).
        lo = tl.join(
            tl.join(word & 7, (word >> 12) & 7), tl.join((word >> 6) & 7, (word >> 18) & 7)
        )
        hi = tl.join(
            tl.join((word >> 3) & 7, (word >> 15) & 7), tl.join((word >> 9) & 7, (word >> 21) & 7)
        )
        codes = tl.join(lo, hi).reshape(BLOCK_R, BLOCK_K)
    else:  # 8 // BITS codes in each byte
        units = k0 * BITS // 8 + tl.arange(0, BLOCK_K * BITS // 8)
        ok = row_ok[:, None] & (units[None, :] < row_bytes)
        ptr = codes_ptr + rows[:, None].to(tl.int64) * row_bytes + units[None, :]
        byte = tl.load(ptr, mask=ok, other=0).to(tl.int32)  # (BLOCK_R, BLOCK_K * BITS // 8)
        if BITS == 4:
            codes = tl.join(byte & 15, byte >> 4).reshape(BLOCK_R, BLOCK_K)
        else:
            codes = tl.join(
                tl.join(byte & 3, (byte >> 4) & 3), tl.join((byte >> 2) & 3, byte >> 6)
            ).reshape(BLOCK_R, BLOCK_K)
    return codes


@triton.jit
def dequantize(codes_ptr, values_ptr, rows, row_ok, k0, d_in, group_size, gpr,
               BITS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """Ŵ[rows, k0 : k0 + BLOCK_K] from the codes and the fp32 (d_out, gpr, 2**BITS) tables.

    Returns (BLOCK_R, BLOCK_K) fp32, zero outside the matrix. The lookup is a gather from the
    tables of the tile's (row, group)s: 64 bytes each at 4 bits, so they stay in L1.
    """
    codes = load_codes(codes_ptr, rows, row_ok, k0, d_in, BITS, BLOCK_R, BLOCK_K)
    cols = k0 + tl.arange(0, BLOCK_K)
    table = (rows[:, None] * gpr + (cols // group_size)[None, :]) << BITS  # (BLOCK_R, BLOCK_K)
    ok = row_ok[:, None] & (cols < d_in)[None, :]
    return tl.load(values_ptr + table + codes, mask=ok, other=0.0)


@triton.jit
def grouped_tile(pid, m, n, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(tile row, tile column) of program `pid`, GROUP_M tile rows at a time so that the
    programs running together share their operand tiles in L2."""
    tiles_m = (m + BLOCK_M - 1) // BLOCK_M
    tiles_n = (n + BLOCK_N - 1) // BLOCK_N
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    size_m = tl.minimum(tiles_m - first_m, GROUP_M)
    return first_m + (pid % per_group) % size_m, (pid % per_group) // size_m
