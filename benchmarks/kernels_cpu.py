"""Issue-5 kernel targets on this CPU, measured in one run.

Prints, for a 4096 x 4096 layer (4 bits, gpr 4 unless told): the single-row LUT GEMV against
torch's dense fp32 and bf16 GEMV, the time per weight at bits 2/3/4 (fp32 tables as in training,
bf16 tables as stored and loaded for inference); the GEMV on SmolLM2-135M's layer shapes; prefill
of 512 tokens against dense fp32 GEMM, a training step (forward + backward, 8 x 128 tokens)
against the reference path, and the machine's streaming-read bandwidth with the floor it implies
for the GEMV.
Every time is the median of --repeats medians (the machine is shared: expect noise).

    .venv/bin/python benchmarks/kernels_cpu.py [--size 4096 --gpr 4 --repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from sketchtune import kernels
from sketchtune.format import pack_codes
from sketchtune.kernels import cpu

SMOLLM2_SHAPES = ((576, 576), (192, 576), (1536, 576), (576, 1536))


def median_time(fn: Callable[[], object], repeats: int, min_seconds: float = 0.2) -> float:
    """Median over `repeats` rounds of the mean time per call within a round."""
    fn()
    start, calls = time.perf_counter(), 0
    while time.perf_counter() - start < min_seconds / repeats or calls < 2:
        fn()
        calls += 1
    rounds = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        rounds.append((time.perf_counter() - start) / calls)
    return statistics.median(rounds)


def read_bandwidth(repeats: int) -> float:
    """Streaming-read bytes per second: a sum over 512 MiB, far beyond the caches."""
    data = torch.ones(128 << 20)
    return data.numel() * 4 / median_time(lambda: data.sum(), repeats, min_seconds=1.0)


def random_sketch(d_out: int, d_in: int, bits: int, gpr: int):
    codes = torch.randint(0, 1 << bits, (d_out, d_in), dtype=torch.uint8)
    return pack_codes(codes, bits), torch.randn(d_out, gpr, 1 << bits)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--gpr", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--prefill", type=int, default=512)
    parser.add_argument("--threads", type=int, default=None, help="default: torch's")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not cpu.available():
        raise SystemExit("the CPU kernels could not be built")
    d, r = args.size, args.repeats
    print(
        f"threads {torch.get_num_threads()}, kernels {cpu.isa()}, layer {d} x {d}, "
        f"gpr {args.gpr}, median of {r}"
    )

    bandwidth = read_bandwidth(r)
    print(f"streaming read bandwidth        {bandwidth / 1e9:8.2f} GB/s")

    dense = torch.randn(d, d) / d**0.5
    dense_bf16 = dense.bfloat16()
    x = torch.randn(1, d)
    t_fp32 = median_time(lambda: F.linear(x, dense), r)
    t_bf16 = median_time(lambda: F.linear(x.bfloat16(), dense_bf16), r)
    print(f"dense GEMV fp32 {t_fp32 * 1e3:8.3f} ms   bf16 {t_bf16 * 1e3:8.3f} ms")

    for bits in (4, 3, 2):
        codes, values = random_sketch(d, d, bits, args.gpr)
        # fp32 tables as in training; bf16 tables as stored on disk and loaded for inference
        for tables in (values, values.bfloat16()):
            t = median_time(lambda: kernels.lut_linear(x, codes, tables, bits), r)  # noqa: B023
            moved = codes.numel() + tables.numel() * tables.element_size() + (x.numel() + d) * 4
            line = (
                f"{bits}-bit GEMV, {str(tables.dtype)[6:]:8s} tables {t * 1e3:7.3f} ms "
                f"{t / d / d * 1e12:6.1f} ps/weight {moved / t / 1e9:6.2f} GB/s achieved, "
                f"floor {moved / bandwidth * 1e3:.3f} ms ({t * bandwidth / moved:.2f}x floor)"
            )
            if bits == 4:
                line += f"  vs dense fp32 {t_fp32 / t:5.2f}x faster, bf16 {t_bf16 / t:5.2f}x"
            print(line)

    # Narrow layers (SmolLM2-135M's, 144-wide groups): per-row and per-group costs show here.
    # Both stay in cache across calls, unlike in a decode, which favours the dense one.
    for d_out, d_in in SMOLLM2_SHAPES:
        codes, values = random_sketch(d_out, d_in, 4, args.gpr)
        tables, xn, weight = values.bfloat16(), torch.randn(1, d_in), torch.randn(d_out, d_in)
        t = median_time(lambda: kernels.lut_linear(xn, codes, tables, 4), r)  # noqa: B023
        t_dense = median_time(lambda: F.linear(xn, weight), r)  # noqa: B023
        print(
            f"4-bit GEMV {d_out:4d} x {d_in:4d}, bf16 tables {t * 1e6:7.1f} us "
            f"{t / d_out / d_in * 1e12:6.1f} ps/weight  vs dense fp32 {t_dense / t:5.2f}x faster"
        )

    codes, values = random_sketch(d, d, 4, args.gpr)
    xs = torch.randn(args.prefill, d)
    t_dense = median_time(lambda: F.linear(xs, dense), r)
    t_sketch = median_time(lambda: kernels.lut_linear(xs, codes, values, 4), r)
    print(
        f"prefill {args.prefill} tokens: sketch {t_sketch * 1e3:8.2f} ms, dense fp32 GEMM "
        f"{t_dense * 1e3:8.2f} ms, ratio {t_sketch / t_dense:5.2f}"
    )

    xt = torch.randn(8, 128, d)
    grad = torch.randn(8, 128, d)

    def step() -> None:
        xg = xt.clone().requires_grad_(True)
        vg = values.clone().requires_grad_(True)
        kernels.lut_linear(xg, codes, vg, 4).backward(grad)

    t_fast = median_time(step, r)
    with kernels.reference_only():
        t_ref = median_time(step, r)
    print(
        f"train step 8x128 fwd+bwd: fast {t_fast * 1e3:8.1f} ms, reference {t_ref * 1e3:8.1f} "
        f"ms, speed-up {t_ref / t_fast:5.2f}x"
    )


if __name__ == "__main__":
    main()
