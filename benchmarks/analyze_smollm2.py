"""Issue-7 targets on SmolLM2-135M: sketch vs low rank on a commonsense and a math update.

For each task, a short full fine-tune of the dense model gives ΔW; every one of the 210 sketched
projections is then compared (rank-r, frozen codes, free codes; Frobenius and Hessian-weighted),
with the codes of a data-aware sketch of the same model. Writes
benchmarks/results/analyze_<task>.{json,csv,png} and prints each summary with its timings.

    .venv/bin/sketchtune compress smollm2-135m -o /tmp/smol-g4b --samples 8 --seq-len 256
    .venv/bin/python benchmarks/analyze_smollm2.py --sketched /tmp/smol-g4b
"""

from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path

import numba
import torch

from sketchtune.analyze import (
    AnalyzeRequest,
    FinetuneSettings,
    analyze_model,
    synthetic_table,
    write_outputs,
)
from sketchtune.analyze.synthetic import format_table
from sketchtune.atomic import write_json_atomic

# task -> (batch size, tokens per example): the same ~512 tokens per step; GSM8K solutions need 256
TASKS = {"ARC-Easy": (4, 128), "gsm8k": (2, 256)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sketched", default="/tmp/smol-g4b", help="sketched SmolLM2 folder")
    parser.add_argument("--base", default="smollm2-135m")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output-dir", default="benchmarks/results")
    args = parser.parse_args()
    if not (Path(args.sketched) / "config.json").is_file():
        parser.error(f"{args.sketched} is not a sketched model: compress one first (see above)")
    torch.set_num_threads(args.threads)
    numba.set_num_threads(args.threads)

    start = time.perf_counter()
    table = synthetic_table()
    print(format_table(table))
    write_json_atomic(Path(args.output_dir) / "analyze_synthetic.json", {
        "shape": [256, 256], "bits": 4, "gpr": 4, "seconds": round(time.perf_counter() - start, 1),
        "classes": table,
    })
    for task in args.tasks:
        batch_size, seq_len = TASKS[task]
        request = AnalyzeRequest(
            model=args.sketched, base=args.base, short_finetune=task,
            finetune=FinetuneSettings(args.steps, args.lr, batch_size, seq_len),
        )
        wall, cpu = time.perf_counter(), _cpu_seconds()
        result = analyze_model(request, progress=False)
        result["wall_seconds"] = round(time.perf_counter() - wall, 1)
        result["cpu_seconds"] = round(_cpu_seconds() - cpu, 1)
        result["threads"] = args.threads
        paths = write_outputs(result, args.output_dir, stem=f"analyze_{task.lower()}")
        print(f"\n{task}: {result['wall_seconds']} s wall, {result['cpu_seconds']} s CPU "
              f"({result['seconds']}); loss {result['finetune']['losses'][0]} -> "
              f"{result['finetune']['losses'][-1]}")
        print(result["summary"])
        print("wrote " + ", ".join(str(p) for p in paths.values()))


def _cpu_seconds() -> float:
    """CPU time of this process and its threads: on a shared machine wall time also counts waits."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


if __name__ == "__main__":
    main()
