"""Extra memory of one `learn_sketch` call on Llama-3.2-1B's largest layers.

Shapes: the MLP down projection (W 2048 x 8192, H 8192 x 8192) and gate+up stacked as compress
stacks them (W 16384 x 2048, H 2048 x 2048). W is random, H = XᵀX / n from random X (n rows), both
fp32. Each shape runs in a fresh child process: build the inputs, warm numba and torch up on a
small layer, hand freed heap back, restart the high-water mark, call learn_sketch, and report the
peak RSS above the RSS just before the call (in MB, bytes per weight and multiples of the
d_in² x 4 bytes of one fp32 Hessian) and the seconds it took.

    OMP_NUM_THREADS=1 NUMBA_NUM_THREADS=1 .venv/bin/python benchmarks/learn_memory.py
        [--shapes down gate_up] [--rows N] [--learn-module DIR/learn.py]

--learn-module measures another copy of learn.py (with its kmeans.py beside it), e.g. the old one
from `git show REV:src/sketchtune/learn.py`; --rows keeps only the first N rows of W (the factor
costs the same, the row work shrinks).
"""

from __future__ import annotations

import argparse
import importlib
import json
import subprocess
import sys
import time
import types
from pathlib import Path

from machine import machine_line

SHAPES = {"down": (2048, 8192), "gate_up": (16384, 2048)}  # (d_out, d_in)


def load_learn(path: str | None) -> types.ModuleType:
    """sketchtune.learn, or the learn.py at `path` imported as a package with its directory (so
    that its `from .kmeans import ...` finds the kmeans.py beside it)."""
    if path is None:
        return importlib.import_module("sketchtune.learn")
    package = types.ModuleType("_learn_under_test")
    package.__path__ = [str(Path(path).resolve().parent)]
    sys.modules[package.__name__] = package
    return importlib.import_module(f"{package.__name__}.{Path(path).stem}")


def worker(shape: str, rows: int | None, samples: int, learn_module: str | None) -> dict:
    import torch

    from sketchtune.memory import (
        high_water_bytes,
        release_free_heap,
        reset_high_water,
        resident_bytes,
    )

    learn = load_learn(learn_module)
    d_out, d_in = SHAPES[shape]
    d_out = min(d_out, rows or d_out)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(samples, d_in, generator=g)
    hessian = x.T @ x / samples
    del x
    weight = torch.randn(d_out, d_in, generator=g)
    small = torch.randn(256, 64, generator=g)
    learn.learn_sketch(torch.randn(8, 64, generator=g), small.T @ small)  # compile numba
    release_free_heap()
    reset_high_water()
    entry = resident_bytes()
    start = time.perf_counter()
    learn.learn_sketch(weight, hessian)
    seconds = time.perf_counter() - start
    extra = high_water_bytes() - entry
    return {"shape": shape, "d_out": d_out, "d_in": d_in, "samples": samples,
            "learn": learn.__file__, "extra_bytes": extra, "seconds": seconds,
            "bytes_per_weight": extra / (d_out * d_in), "hessians": extra / (4 * d_in * d_in)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", choices=SHAPES, default=list(SHAPES))
    parser.add_argument("--rows", type=int, help="use only the first ROWS rows of each W")
    parser.add_argument("--samples", type=int, default=4096, help="rows of X behind H")
    parser.add_argument("--learn-module", help="path of another learn.py to measure")
    parser.add_argument("--worker", choices=SHAPES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.rows, args.samples, args.learn_module)))
        return

    print(machine_line())
    print(f"learn module: {args.learn_module or 'sketchtune.learn'}")
    for shape in args.shapes:
        command = [sys.executable, __file__, "--worker", shape, "--samples", str(args.samples)]
        command += ["--rows", str(args.rows)] * (args.rows is not None)
        command += ["--learn-module", args.learn_module] * (args.learn_module is not None)
        done = subprocess.run(command, check=True, capture_output=True, text=True)
        row = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"{shape:8s} W {row['d_out']} x {row['d_in']}: extra peak RSS "
              f"{row['extra_bytes'] / 1e6:7.0f} MB = {row['bytes_per_weight']:5.1f} B/weight = "
              f"{row['hessians']:4.2f} x d_in² x 4; {row['seconds']:6.1f} s", flush=True)


if __name__ == "__main__":
    main()
