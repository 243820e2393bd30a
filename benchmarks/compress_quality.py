"""Issue-2 targets on SmolLM2-135M, measured in one run.

Prints held-out perplexity of the dense model (dequantized Q4_1 GGUF weights), of the data-aware
sketch and of plain per-row k-means (no Hessian steps), the compression time, and the size on disk
against what the format needs and against the bf16 model.

    .venv/bin/python benchmarks/compress_quality.py [--samples 32 --seq-len 512 --gpr 4]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from sketchtune.api import compress, heldout_perplexity
from sketchtune.atomic import write_json_atomic
from sketchtune.compression import SketchConfig
from sketchtune.hub import WEIGHTS_NAME, save_sketched
from sketchtune.layers import SketchLinear
from sketchtune.sources import load_dense


def format_bytes(model) -> int:
    """What the format needs: codes at bits/8 byte per weight, values and the dense rest at 2."""
    total, seen = 0, set()
    for module in model.modules():
        if isinstance(module, SketchLinear):
            total += module.codes.numel() + 2 * module.values.numel()
            seen.update(id(t) for t in (module.codes, module.values))
    for param in model.parameters():  # parameters() yields tied tensors once
        if id(param) not in seen:
            total += 2 * param.numel()
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--gpr", type=int, default=4)
    parser.add_argument("--lloyd", action="store_true", help="also run Lloyd k-means (slower)")
    parser.add_argument("--output", default="benchmarks/results/compress_quality.json")
    args = parser.parse_args()

    model, tokenizer = load_dense(args.model)
    bf16_bytes = 2 * sum(p.numel() for p in model.parameters())
    dense = heldout_perplexity(model, tokenizer, args.samples, args.seq_len, progress=False)
    results = {"settings": vars(args), "dense": dense, "bf16_model_bytes": bf16_bytes}
    print(f"dense (dequantized Q4_1)    perplexity {dense['perplexity']:8.3f}")

    variants = {"data_aware": SketchConfig(bits=args.bits, gpr=args.gpr)}
    if args.lloyd:
        variants["data_aware_lloyd"] = SketchConfig(bits=args.bits, gpr=args.gpr, kmeans="lloyd")
    variants["plain_kmeans"] = SketchConfig(bits=args.bits, gpr=args.gpr, data_aware=False)
    for name, config in variants.items():
        model, tokenizer = load_dense(args.model)
        start = time.perf_counter()
        compress(model, tokenizer, config, samples=args.samples, seq_len=args.seq_len)
        seconds = time.perf_counter() - start
        ppl = heldout_perplexity(model, tokenizer, args.samples, args.seq_len, progress=False)
        entry = {"compress_seconds": seconds, **ppl}
        entry["perplexity_ratio"] = ppl["perplexity"] / dense["perplexity"]
        if name == "data_aware":
            with tempfile.TemporaryDirectory() as tmp:
                save_sketched(model, tokenizer, Path(tmp) / "m")
                entry["bytes_on_disk"] = (Path(tmp) / "m" / WEIGHTS_NAME).stat().st_size
            entry["format_bytes"] = format_bytes(model)
            entry["disk_over_format"] = entry["bytes_on_disk"] / entry["format_bytes"]
            entry["disk_over_bf16"] = entry["bytes_on_disk"] / bf16_bytes
        results[name] = entry
        print(
            f"{name:27s} perplexity {ppl['perplexity']:8.3f}  ratio to dense "
            f"{entry['perplexity_ratio']:.3f}  compressed in {seconds:.0f} s"
        )
    aware = results["data_aware"]
    print(
        f"on disk {aware['bytes_on_disk'] / 1e6:.1f} MB = {aware['disk_over_format']:.3f}x what "
        f"the format needs, {aware['disk_over_bf16']:.3f}x the bf16 model"
    )
    write_json_atomic(args.output, results)
    print(f"written: {args.output}")


if __name__ == "__main__":
    main()
