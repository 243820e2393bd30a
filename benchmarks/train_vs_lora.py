"""Issue-3 targets: fine-tuning SketchTune vs PEFT LoRA vs a QLoRA-style base, in one run.

Each method trains SmolLM2-135M for the same steps on the same batches (8 x 128 tokens of
ARC-Easy train, padded to 128, loss on responses), in its own process so peak memory is its own.
Gradient checkpointing is off for all of them. The methods run in turns (sketch, LoRA, QLoRA-style,
then again, `--rounds` times) so that a busy machine slows them alike; each method's step time is
its fastest round's. Prints step time, tokens/s, bytes held for model plus optimizer state, peak
process memory, adapter file size, and the ratios to LoRA.

    .venv/bin/python benchmarks/train_vs_lora.py [--sketch runs/smol-g4] [--steps 6] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from machine import machine_line

from sketchtune.cliargs import positive_int

MODEL = "smollm2-135m"
BATCH, SEQ = 8, 128


def fixed_batches(tokenizer, steps: int) -> list[dict]:
    from sketchtune.data.tasks import load_examples
    from sketchtune.data.tokens import IGNORE_INDEX, pad_id, tokenize_examples

    examples, _ = load_examples("ARC-Easy", "train")
    dataset, _ = tokenize_examples(examples[: 4 * BATCH * steps], tokenizer, SEQ)
    pad = pad_id(tokenizer)
    batches = []
    for start in range(0, BATCH * steps, BATCH):
        rows = dataset[start : start + BATCH]
        ids = torch.full((BATCH, SEQ), pad)
        labels = torch.full((BATCH, SEQ), IGNORE_INDEX)
        mask = torch.zeros(BATCH, SEQ, dtype=torch.long)
        for i, (x, y) in enumerate(zip(rows["input_ids"], rows["labels"], strict=True)):
            ids[i, : len(x)], labels[i, : len(y)], mask[i, : len(x)] = (
                torch.tensor(x), torch.tensor(y), 1,
            )
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return batches


def held_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[int, int]:
    """(model bytes: parameters and buffers, each storage once; optimizer state bytes).

    SketchLinear keeps no unpacked copy of its codes (the CPU op reads the packed ones), so
    parameters and buffers are all a sketched model holds.
    """
    from sketchtune.memory import storage_bytes

    model_bytes = storage_bytes([*model.parameters(), *model.buffers()])
    opt_bytes = sum(
        v.numel() * v.element_size()
        for state in optimizer.state.values()
        for v in state.values()
        if torch.is_tensor(v)
    )
    return model_bytes, opt_bytes


def adapter_file_bytes(method: str, model) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        if method == "sketch":
            from sketchtune.task_sketch import extract_task_sketch, write_task_sketch

            write_task_sketch(extract_task_sketch(model), tmp)
            return (Path(tmp) / "values.safetensors").stat().st_size
        if method == "lora":
            model.save_pretrained(tmp)
            return (Path(tmp) / "adapter_model.safetensors").stat().st_size
    return 0


def worker(method: str, sketch_dir: str, steps: int, rank: int) -> dict:
    from sketchtune.api import load
    from sketchtune.baselines import lora_model, qlora_style_model
    from sketchtune.memory import peak_rss_bytes
    from sketchtune.sources import load_dense
    from sketchtune.train import freeze_all_but_values

    torch.manual_seed(0)
    dense, tokenizer = load_dense(MODEL)
    if method == "sketch":
        del dense
        model = load(sketch_dir)
        freeze_all_but_values(model)
    elif method == "lora":
        model = lora_model(dense, rank)
    else:
        model = qlora_style_model(dense, rank)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
    batches = fixed_batches(tokenizer, steps + 1)
    times, losses = [], []
    for batch in batches:
        start = time.perf_counter()
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
        losses.append(loss.item())
    model_bytes, opt_bytes = held_bytes(model, optimizer)
    step = sorted(times[1:])[len(times[1:]) // 2]  # median, first step is warm-up
    tokens = sum(int(b["attention_mask"].sum()) for b in batches[1:]) / len(batches[1:])
    return {
        "method": method,
        "trainable_parameters": sum(p.numel() for p in params),
        "step_seconds": step,
        "tokens_per_second": tokens / step,
        "model_bytes": model_bytes,
        "optimizer_bytes": opt_bytes,
        "held_bytes": model_bytes + opt_bytes,
        "peak_rss_bytes": peak_rss_bytes(),
        "adapter_file_bytes": adapter_file_bytes(method, model),
        "losses": losses,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sketch", default="runs/smol-g4", help="sketched SmolLM2 folder (gpr 4)")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--rounds", type=positive_int, default=2, help="turns of the three methods")
    parser.add_argument("--worker", choices=("sketch", "lora", "qlora"))
    parser.add_argument("--output", default="benchmarks/results/train_vs_lora.json")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.sketch, args.steps, args.rank)))
        return
    if not (Path(args.sketch) / "config.json").is_file():
        sys.exit(f"no sketched model at {args.sketch}: run `sketchtune compress smollm2-135m "
                 f"-o {args.sketch} --gpr 4` first")
    machine = machine_line()  # before the runs: the load they start under
    print(machine)
    rounds: dict[str, list[dict]] = {m: [] for m in ("sketch", "lora", "qlora")}
    for _ in range(args.rounds):
        for method, runs in rounds.items():
            out = subprocess.run(
                [sys.executable, __file__, "--worker", method, "--sketch", args.sketch,
                 "--steps", str(args.steps), "--rank", str(args.rank)],
                check=True, capture_output=True, text=True,
            ).stdout
            runs.append(json.loads(out.strip().splitlines()[-1]))
    results = {}
    for method, runs in rounds.items():
        r = results[method] = min(runs, key=lambda run: run["step_seconds"])
        r["step_seconds_per_round"] = [run["step_seconds"] for run in runs]
        print(f"{method:6s} {r['trainable_parameters'] / 1e6:5.2f}M trainable  "
              f"{r['step_seconds']:6.2f} s/step  {r['tokens_per_second']:7.0f} tok/s  "
              f"held {r['held_bytes'] / 1e6:7.1f} MB  peak {r['peak_rss_bytes'] / 1e6:7.1f} MB  "
              f"adapter {r['adapter_file_bytes'] / 1e6:5.1f} MB")
    s, lo, q = results["sketch"], results["lora"], results["qlora"]
    ratios = {
        "held_bytes_vs_lora": s["held_bytes"] / lo["held_bytes"],
        "peak_rss_vs_lora": s["peak_rss_bytes"] / lo["peak_rss_bytes"],
        "tokens_per_second_vs_lora": s["tokens_per_second"] / lo["tokens_per_second"],
        "tokens_per_second_vs_qlora": s["tokens_per_second"] / q["tokens_per_second"],
        "adapter_file_vs_lora": s["adapter_file_bytes"] / lo["adapter_file_bytes"],
    }
    for name, value in ratios.items():
        print(f"{name:28s} {value:.3f}")
    from sketchtune.atomic import write_json_atomic

    write_json_atomic(args.output, {"settings": vars(args), "machine": machine,
                                    "results": results, "ratios": ratios})


if __name__ == "__main__":
    main()
