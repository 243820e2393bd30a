"""`sketchtune demo`: compress the embedded SmolLM2-135M, generate with it, compare perplexity."""

from __future__ import annotations

from pathlib import Path

from .api import compress_to_folder, heldout_perplexity, load_any
from .atomic import write_json_atomic
from .compression import SketchConfig
from .generate import generate_text

DEMO_MODEL = "smollm2-135m"
DEMO_PROMPT = "What is the capital of France?"


def run_demo(output_dir: Path, samples: int = 32, seq_len: int = 512) -> dict:
    """Dense (dequantized Q4_1 GGUF weights) vs sketched (4 bits, gpr 4) on held-out text."""
    sketch_dir = output_dir / "smollm2-135m-sketch"
    print(f"[1/3] compressing {DEMO_MODEL} -> {sketch_dir}")
    summary = compress_to_folder(
        DEMO_MODEL, sketch_dir, SketchConfig(bits=4, gpr=4), samples, seq_len, force=True
    )
    results = {"compress": summary}
    print("[2/3] held-out perplexity, dense then sketched")
    for label, name in (("dense", DEMO_MODEL), ("sketched", str(sketch_dir))):
        model, tokenizer = load_any(name)
        results[label] = heldout_perplexity(model, tokenizer, samples, seq_len)
        results[label]["sample"] = generate_text(model, tokenizer, DEMO_PROMPT, 32, chat=True)
    ratio = results["sketched"]["perplexity"] / results["dense"]["perplexity"]
    results["perplexity_ratio"] = ratio
    write_json_atomic(output_dir / "results.json", results)
    print("[3/3] results")
    print(f"  compressed in {summary['seconds']:.0f} s, {summary['bytes_on_disk'] / 1e6:.1f} MB")
    for label in ("dense", "sketched"):
        print(f"  {label:9s} perplexity {results[label]['perplexity']:.3f}")
        print(f"  {label:9s} says: {results[label]['sample']!r}")
    print(f"  sketched / dense perplexity: {ratio:.3f}")
    print("  (dense = SmolLM2-135M-Instruct as shipped: dequantized Q4_1 GGUF weights)")
    print(f"  written: {output_dir / 'results.json'}")
    return results
