"""The QLoRA-style baseline's per-forward cost: dequantizing its NF4 base, on SmolLM2-135M's
layer shapes, by one byte-table lookup (`baselines.dequantize_nf4`) against the unpacked
per-code lookup it replaced (`dequantize_nf4_reference`), and both against the layer's own
matmul on an evaluation batch (4 x 128 tokens). The calls take turns in every round; the ratios
hold better than the times on a shared machine. Writes benchmarks/results/nf4_dequant.json.

    .venv/bin/python benchmarks/nf4_dequant.py [--repeats 5]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from kernels_cpu import SMOLLM2_SHAPES, median_times
from machine import machine_line

from sketchtune.atomic import write_json_atomic
from sketchtune.baselines import dequantize_nf4, dequantize_nf4_reference, quantize_nf4

OUTPUT = Path(__file__).parent / "results" / "nf4_dequant.json"


def measure(d_out: int, d_in: int, repeats: int) -> dict:
    weight = torch.randn(d_out, d_in)
    packed, scales = quantize_nf4(weight)
    x = torch.randn(4 * 128, d_in)
    times = median_times({
        "byte_table": lambda: dequantize_nf4(packed, scales, d_in),
        "unpacked": lambda: dequantize_nf4_reference(packed, scales, d_in),
        "matmul": lambda: F.linear(x, weight),
    }, repeats)
    written = d_out * d_in * 4  # bytes of the fp32 weight each dequant produces
    return {"shape": [d_out, d_in], **{f"{k}_ms": v * 1e3 for k, v in times.items()},
            "byte_table_gb_s": written / times["byte_table"] / 1e9,
            "speedup": times["unpacked"] / times["byte_table"],
            "dequant_over_matmul": times["byte_table"] / times["matmul"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="rounds; the median is reported")
    args = parser.parse_args()
    print(machine_line())
    rows = [measure(d_out, d_in, args.repeats) for d_out, d_in in SMOLLM2_SHAPES]
    for row in rows:
        d_out, d_in = row["shape"]
        print(f"{d_out:5d} x {d_in:5d}: byte table {row['byte_table_ms']:.2f} ms "
              f"({row['byte_table_gb_s']:.1f} GB/s written), unpacked {row['unpacked_ms']:.2f} ms "
              f"-> {row['speedup']:.1f}x; dequant / matmul {row['dequant_over_matmul']:.2f}")
    write_json_atomic(OUTPUT, {"machine": machine_line(), "rows": rows})


if __name__ == "__main__":
    main()
