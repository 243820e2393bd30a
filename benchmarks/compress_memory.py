"""Peak memory of compression: streamed from the source safetensors vs the model loaded whole.

Each mode runs in its own process (peak RSS is per process) and compresses SmolLM2-135M to a
temporary folder. Prints both peaks, their ratio, and what the process holds at least in either
case: the fp32 dense model (whole) or the embeddings + head + one fp32 block (streamed), next to
the calibration activations both keep.

    .venv/bin/python benchmarks/compress_memory.py [--samples 32 --seq-len 512]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sketchtune.atomic import write_json_atomic

MODEL = "smollm2-135m"


def worker(mode: str, samples: int, seq_len: int, output: str) -> dict:
    import torch

    from sketchtune.api import compress, compress_to_folder
    from sketchtune.compression import SketchConfig, find_decoder_blocks
    from sketchtune.hub import save_sketched
    from sketchtune.memory import peak_rss_bytes
    from sketchtune.sources import load_dense

    config = SketchConfig(bits=4, gpr=4)
    start = time.perf_counter()
    if mode == "streamed":
        summary = compress_to_folder(MODEL, output, config, samples, seq_len, progress=False)
        assert summary["streamed"]
    else:
        model, tokenizer = load_dense(MODEL)
        compress(model, tokenizer, config, samples=samples, seq_len=seq_len, progress=False)
        save_sketched(model, tokenizer, output)
    seconds = time.perf_counter() - start
    dense, _ = load_dense(MODEL)  # after the peak: only for the sizes below
    _, blocks = find_decoder_blocks(dense)
    fp32 = torch.finfo(torch.float32).bits // 8
    return {
        "mode": mode,
        "seconds": seconds,
        "peak_rss_bytes": peak_rss_bytes(),
        "dense_fp32_bytes": fp32 * sum(p.numel() for p in dense.parameters()),
        "block_fp32_bytes": fp32 * sum(p.numel() for p in blocks[0].parameters()),
        "activation_bytes": fp32 * samples * seq_len * dense.config.hidden_size,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--worker", choices=["streamed", "whole"], help=argparse.SUPPRESS)
    parser.add_argument("--worker-output", help=argparse.SUPPRESS)
    parser.add_argument("--output", default="benchmarks/results/compress_memory.json")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.samples, args.seq_len, args.worker_output)))
        return

    rows = {}
    for mode in ("streamed", "whole"):
        with tempfile.TemporaryDirectory() as tmp:
            done = subprocess.run(
                [sys.executable, __file__, "--worker", mode, "--samples", str(args.samples),
                 "--seq-len", str(args.seq_len), "--worker-output", str(Path(tmp) / "m")],
                check=True, capture_output=True, text=True,
            )
        rows[mode] = json.loads(done.stdout.strip().splitlines()[-1])
        row = rows[mode]
        print(f"{mode:9s} peak RSS {row['peak_rss_bytes'] / 2**20:7.1f} MiB, "
              f"compressed and saved in {row['seconds']:.0f} s")
    streamed, whole = rows["streamed"], rows["whole"]
    mib = 2**20
    print(f"streamed / whole peak RSS: {streamed['peak_rss_bytes'] / whole['peak_rss_bytes']:.3f}x"
          f" ({(whole['peak_rss_bytes'] - streamed['peak_rss_bytes']) / mib:.0f} MiB less)")
    print(f"for scale: dense fp32 model {whole['dense_fp32_bytes'] / mib:.0f} MiB, one block "
          f"{whole['block_fp32_bytes'] / mib:.1f} MiB, calibration activations "
          f"{whole['activation_bytes'] / mib:.0f} MiB per copy")
    write_json_atomic(args.output, {"settings": vars(args), **rows})
    print(f"written: {args.output}")


if __name__ == "__main__":
    main()
