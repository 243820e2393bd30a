"""Issue-5 kernel targets on this CPU, measured in one run.

Prints, for a 4096 x 4096 layer (4 bits, gpr 4 unless told): the single-row LUT GEMV against
torch's dense fp32 and bf16 GEMV, the time per weight at bits 2/3/4 (fp32 tables as in training,
bf16 tables as stored and loaded for inference); the GEMV on SmolLM2-135M's layer shapes and its
bf16 output head; prefill of 512 tokens against dense fp32 GEMM, a training step (forward +
backward, 8 x 128 tokens) against the reference path and, under bf16 autocast, against a dense
layer with a trainable weight (the same three GEMMs), and the machine's streaming-read bandwidth
with the floor it implies for the GEMV.
Every time is the median of --repeats rounds in which the compared calls take turns (the
machine is shared: expect noise in the times, less in the ratios).

    .venv/bin/python benchmarks/kernels_cpu.py [--size 4096 --gpr 4 --repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from machine import machine_line

from sketchtune import kernels
from sketchtune.format import pack_codes
from sketchtune.kernels import cpu
from sketchtune.train import native_bf16

# One SmolLM2-135M decoder layer's projections in call order: q, k, v, o, gate, up, down.
SMOLLM2_LAYER = ((576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576),
                 (576, 1536))
SMOLLM2_SHAPES = tuple(dict.fromkeys(SMOLLM2_LAYER))  # each shape once, in call order


def median_times(fns: dict[str, Callable[[], object]], repeats: int,
                 min_seconds: float = 0.2) -> dict[str, float]:
    """Per function, the median over `repeats` rounds of the mean time per call within a round.
    The functions take turns in every round, so that the machine's slow spells (it is shared)
    fall on all of them alike and the ratios between them hold better than the times."""
    calls = {}
    for name, fn in fns.items():
        fn()
        start, calls[name] = time.perf_counter(), 0
        while time.perf_counter() - start < min_seconds / repeats or calls[name] < 2:
            fn()
            calls[name] += 1
    rounds = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(calls[name]):
                fn()
            rounds[name].append((time.perf_counter() - start) / calls[name])
    return {name: statistics.median(times) for name, times in rounds.items()}


def median_time(fn: Callable[[], object], repeats: int, min_seconds: float = 0.2) -> float:
    return median_times({"": fn}, repeats, min_seconds)[""]


def read_bandwidth(repeats: int) -> float:
    """Streaming-read bytes per second: a sum over 512 MiB, far beyond the caches."""
    data = torch.ones(128 << 20)
    return data.numel() * 4 / median_time(lambda: data.sum(), repeats, min_seconds=1.0)


def random_sketch(d_out: int, d_in: int, bits: int, gpr: int):
    codes = torch.randint(0, 1 << bits, (d_out, d_in), dtype=torch.uint8)
    return pack_codes(codes, bits), torch.randn(d_out, gpr, 1 << bits)


def decode_token_layers(gpr: int, repeats: int) -> None:
    """A decode token's projections: SmolLM2's 30 layers x 7, each read once per token, so from
    DRAM (the machine's L3 holds neither set), as in `generate`."""
    layers = [shape for _ in range(30) for shape in SMOLLM2_LAYER]
    xs = {d_in: torch.randn(1, d_in) for _, d_in in layers}
    sketched = []  # (activation row, packed codes, bf16 tables) per call
    for d_out, d_in in layers:
        codes, values = random_sketch(d_out, d_in, 4, gpr)
        sketched.append((xs[d_in], codes, values.bfloat16()))
    dense = [(xs[d_in], torch.randn(d_out, d_in)) for d_out, d_in in layers]
    pair = median_times({
        "sketch": lambda: [kernels.lut_linear(x, c, v, 4) for x, c, v in sketched],
        "dense": lambda: [F.linear(x, w) for x, w in dense],
    }, repeats)
    sketch_bytes = sum(c.numel() + v.numel() * v.element_size() for _, c, v in sketched)
    print(
        f"decode token's 210 SmolLM2 projections, each read once: sketch "
        f"{pair['sketch'] * 1e3:6.2f} ms {sketch_bytes / pair['sketch'] / 1e9:6.2f} GB/s "
        f"achieved, dense fp32 {pair['dense'] * 1e3:6.2f} ms, "
        f"{pair['dense'] / pair['sketch']:5.2f}x faster"
    )


def isa_comparison(d: int, gpr: int, repeats: int) -> None:
    """The 4-bit GEMV of a d x d layer under every instruction set this CPU runs, in turns
    (each call selects its ISA first: a dispatcher call, ~1 us against a ~0.5 ms GEMV)."""
    codes, values = random_sketch(d, d, 4, gpr)
    x = torch.randn(1, d)
    fns = {}
    for name in [n for n in kernels.runnable_cpu_isas() if n != "emu16"]:
        for tables in (values, values.bfloat16()):
            key = (name, str(tables.dtype)[6:])
            fns[key] = lambda n=name, t=tables: (kernels.set_compute_path(n),
                                                      kernels.lut_linear(x, codes, t, 4))
    times = median_times(fns, repeats)
    kernels.set_compute_path("best")
    for (name, dtype), t in times.items():
        print(f"ISA {name:7s} 4-bit GEMV {d} x {d}, {dtype:8s} tables {t * 1e3:7.3f} ms  "
              f"{times['scalar', dtype] / t if ('scalar', dtype) in times else 1:5.2f}x scalar")


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
        f"{machine_line()}\nlayer {d} x {d}, gpr {args.gpr}, median of {r}"
    )

    bandwidth = read_bandwidth(r)
    print(f"streaming read bandwidth        {bandwidth / 1e9:8.2f} GB/s")

    dense = torch.randn(d, d) / d**0.5
    dense_bf16 = dense.bfloat16()
    x = torch.randn(1, d)
    # Dense and sketched GEMVs take turns (see median_times): the ratios come from one set.
    fns = {"fp32": lambda: F.linear(x, dense), "bf16": lambda: F.linear(x.bfloat16(), dense_bf16)}
    moved = {}
    for bits in (4, 3, 2):
        codes, values = random_sketch(d, d, bits, args.gpr)
        # fp32 tables as in training; bf16 tables as stored on disk and loaded for inference
        for tables in (values, values.bfloat16()):
            key = (bits, str(tables.dtype)[6:])
            fns[key] = lambda c=codes, t=tables, b=bits: kernels.lut_linear(x, c, t, b)
            table_bytes = tables.numel() * tables.element_size()
            moved[key] = codes.numel() + table_bytes + (x.numel() + d) * 4
    times = median_times(fns, r)
    t_fp32, t_bf16 = times.pop("fp32"), times.pop("bf16")
    print(f"dense GEMV fp32 {t_fp32 * 1e3:8.3f} ms   bf16 {t_bf16 * 1e3:8.3f} ms")
    for (bits, dtype), t in times.items():
        line = (
            f"{bits}-bit GEMV, {dtype:8s} tables {t * 1e3:7.3f} ms "
            f"{t / d / d * 1e12:6.1f} ps/weight {moved[bits, dtype] / t / 1e9:6.2f} GB/s "
            f"achieved, floor {moved[bits, dtype] / bandwidth * 1e3:.3f} ms "
            f"({t * bandwidth / moved[bits, dtype]:.2f}x floor)"
        )
        if bits == 4:
            line += f"  vs dense fp32 {t_fp32 / t:5.2f}x faster, bf16 {t_bf16 / t:5.2f}x"
        elif dtype == "bfloat16":
            line += f"  per weight {t / times[4, dtype]:4.2f}x 4-bit's"
        print(line)

    # Narrow layers (SmolLM2-135M's, 144-wide groups): per-row and per-group costs show here.
    # Both stay in cache across calls, unlike in a decode, which favours the dense one.
    for d_out, d_in in SMOLLM2_SHAPES:
        codes, values = random_sketch(d_out, d_in, 4, args.gpr)
        tables, xn, weight = values.bfloat16(), torch.randn(1, d_in), torch.randn(d_out, d_in)
        pair = median_times({
            "sketch": lambda: kernels.lut_linear(xn, codes, tables, 4),  # noqa: B023
            "dense": lambda: F.linear(xn, weight),  # noqa: B023
        }, r)
        t, t_dense = pair["sketch"], pair["dense"]
        print(
            f"4-bit GEMV {d_out:4d} x {d_in:4d}, bf16 tables {t * 1e6:7.1f} us "
            f"{t / d_out / d_in * 1e12:6.1f} ps/weight  vs dense fp32 {t_dense / t:5.2f}x faster"
        )

    decode_token_layers(args.gpr, r)
    isa_comparison(d, args.gpr, r)

    # SmolLM2's output head kept dense in bf16 (serving.bf16_embeddings): our GEMV vs torch's.
    head, xh = torch.randn(49152, 576).bfloat16(), torch.randn(1, 576)
    pair = median_times({
        "ours": lambda: kernels.bf16_linear(xh, head),
        "torch": lambda: F.linear(xh.bfloat16(), head),
    }, r)
    print(
        f"bf16 head GEMV 49152 x 576: ours {pair['ours'] * 1e3:6.2f} ms "
        f"{head.numel() * 2 / pair['ours'] / 1e9:6.2f} GB/s achieved, torch bf16 "
        f"{pair['torch'] * 1e3:6.2f} ms, {pair['torch'] / pair['ours']:5.2f}x faster"
    )

    codes, values = random_sketch(d, d, 4, args.gpr)
    xs = torch.randn(args.prefill, d)
    pair = median_times({
        "dense": lambda: F.linear(xs, dense),
        "sketch": lambda: kernels.lut_linear(xs, codes, values, 4),
    }, r)
    t_dense, t_sketch = pair["dense"], pair["sketch"]
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

    def reference_step() -> None:
        with kernels.compute_path("reference"):
            step()

    pair = median_times({"fast": step, "reference": reference_step}, r)
    t_fast, t_ref = pair["fast"], pair["reference"]
    print(
        f"train step 8x128 fwd+bwd: fast {t_fast * 1e3:8.1f} ms, reference {t_ref * 1e3:8.1f} "
        f"ms, speed-up {t_ref / t_fast:5.2f}x"
    )

    # Under bf16 autocast (what finetune picks on CPUs with bf16 instructions) the tiled paths run
    # bf16 GEMMs; a dense layer with a trainable weight runs the same three GEMMs.
    def dense_step() -> None:
        xg = xt.clone().requires_grad_(True)
        F.linear(xg, dense.clone().requires_grad_(True)).backward(grad)

    def autocast(fn: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                fn()
        return run

    pair = median_times({"sketch": autocast(step), "dense": autocast(dense_step)}, r)
    print(
        f"train step 8x128 fwd+bwd under bf16 autocast (native bf16: {native_bf16()}): sketch "
        f"{pair['sketch'] * 1e3:8.1f} ms, dense trainable weight {pair['dense'] * 1e3:8.1f} ms, "
        f"ratio {pair['sketch'] / pair['dense']:5.2f}; fp32 sketch step / bf16 sketch step "
        f"{t_fast / pair['sketch']:5.2f}x"
    )


if __name__ == "__main__":
    main()
