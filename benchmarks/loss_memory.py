"""Peak memory of a sketch training step: transformers' loss vs the chunked loss (loss.py).

The model is a random-weight Llama with SmolLM2-135M's shape (hidden 576, 30 layers, 9 heads,
3 kv heads, intermediate 1536, vocab 49152, tied head) whose block projections are SketchLinear
layers with random codes and tables (4 bits, gpr 4), only the tables trainable, as in
`sketchtune finetune`. Every position of the random batch carries a label (the most logits the
chunked loss can have to compute). Each variant runs in its own process: build the model, reset
the process's peak RSS (/proc/self/clear_refs), run `--steps` AdamW steps, read the peak
(VmHWM). bf16 autocast follows what `finetune` would pick on this machine (train.native_bf16).

    .venv/bin/python benchmarks/loss_memory.py [--batch 8 --seq-len 256 --steps 2
                                                --checkpointing auto|off|selective|full]

`--checkpointing` defaults to what `finetune` picks for this shape ("auto": selective).
`--checkpointing-cost R` instead times what checkpointing costs: one process, the chunked loss,
R rounds in which a step under each mode (off, selective, full) takes its turn (after one
warm-up round); prints the median seconds and their ratios to "off", into
loss_memory_checkpointing_cost.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import time

from machine import machine_line

from sketchtune.atomic import write_json_atomic
from sketchtune.checkpointing import MODES
from sketchtune.memory import high_water_bytes, reset_high_water

SMOLLM2_135M = dict(
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
    num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
    tie_word_embeddings=True, rope_theta=100000.0,
)
VARIANTS = ("plain", "chunked")


def finetune_mode() -> str:
    """The checkpointing mode `finetune`'s "auto" picks at this shape (its weights counted on a
    meta-device skeleton, as `train.resolve_defaults` counts a loaded model's)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from sketchtune.checkpointing import resolve
    from sketchtune.train import model_weights

    with torch.device("meta"):
        skeleton = LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M))
    return resolve("auto", model_weights(skeleton))


def random_sketched_llama():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from sketchtune.baselines import block_linears
    from sketchtune.layers import SketchLinear
    from sketchtune.train import freeze_all_but_values

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M))
    for name, linear in block_linears(model).items():
        layer = SketchLinear(linear.in_features, linear.out_features, bits=4, gpr=4)
        layer.codes.random_(0, 256)  # two random 4-bit codes per byte
        torch.nn.init.normal_(layer.values, std=0.02)
        model.set_submodule(name, layer)
    freeze_all_but_values(model)
    return model.train()


def worker(variant: str, batch: int, seq_len: int, steps: int, checkpointing: str) -> dict:
    import torch

    from sketchtune import checkpointing as modes
    from sketchtune.kernels import cpu
    from sketchtune.loss import causal_lm_loss
    from sketchtune.memory import release_free_heap
    from sketchtune.train import native_bf16

    cpu.available()  # builds or loads the C++ kernels before the clock starts
    model = random_sketched_llama()
    modes.enable(model, checkpointing)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq_len),
                        generator=torch.Generator().manual_seed(1))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    bf16 = native_bf16()
    autocast = torch.autocast("cpu", torch.bfloat16) if bf16 else contextlib.nullcontext()
    release_free_heap()  # the dense weights the sketch layers replaced
    reset_high_water()
    losses, start = [], time.perf_counter()
    for _ in range(steps):
        with autocast:
            loss = model(**inputs).loss if variant == "plain" else causal_lm_loss(model, inputs)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return {"variant": variant, "checkpointing": checkpointing, "bf16": bf16, "losses": losses,
            "seconds_per_step": (time.perf_counter() - start) / steps,
            "peak_rss_bytes": high_water_bytes()}


def checkpointing_cost(batch: int, seq_len: int, rounds: int) -> dict:
    import statistics

    import torch

    from sketchtune import checkpointing as modes
    from sketchtune.kernels import cpu
    from sketchtune.loss import causal_lm_loss
    from sketchtune.train import native_bf16

    cpu.available()
    model = random_sketched_llama()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq_len),
                        generator=torch.Generator().manual_seed(1))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    bf16 = native_bf16()

    def step(mode: str) -> float:
        modes.enable(model, mode)
        start = time.perf_counter()
        with torch.autocast("cpu", torch.bfloat16) if bf16 else contextlib.nullcontext():
            loss = causal_lm_loss(model, inputs)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    times = {mode: [] for mode in MODES}
    for index in range(rounds + 1):
        for mode in MODES:
            seconds = step(mode)
            if index:  # the first round warms up
                times[mode].append(seconds)
    medians = {mode: statistics.median(times[mode]) for mode in MODES}
    return {"bf16": bf16, "rounds": rounds, "seconds": times, "median": medians,
            "over_off": {mode: medians[mode] / medians["off"] for mode in MODES}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--checkpointing", choices=("auto", *MODES), default="auto",
                        help="activation checkpointing (auto: as finetune picks for this shape)")
    parser.add_argument("--checkpointing-cost", type=int, metavar="ROUNDS",
                        help="time steps without and with checkpointing in turns instead")
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--output", help="default: benchmarks/results/loss_memory_<mode>.json")
    args = parser.parse_args()
    if args.checkpointing == "auto":
        args.checkpointing = finetune_mode()
    if args.worker:
        print(json.dumps(worker(args.worker, args.batch, args.seq_len, args.steps,
                                args.checkpointing)))
        return

    if args.checkpointing_cost:
        print(machine_line())
        cost = checkpointing_cost(args.batch, args.seq_len, args.checkpointing_cost)
        steps = ", ".join(f"{mode} {cost['median'][mode]:.2f} s ({cost['over_off'][mode]:.3f}x)"
                          for mode in MODES)
        print(f"step by checkpointing mode (median of {cost['rounds']} in turns; x: over off): "
              f"{steps} (bf16 autocast: {cost['bf16']})")
        output = args.output or "benchmarks/results/loss_memory_checkpointing_cost.json"
        write_json_atomic(output, {"settings": vars(args), "machine": machine_line(), **cost})
        print(f"written: {output}")
        return

    print(machine_line())
    rows = {}
    for variant in VARIANTS:
        command = [sys.executable, __file__, "--worker", variant, "--batch", str(args.batch),
                   "--seq-len", str(args.seq_len), "--steps", str(args.steps)]
        done = subprocess.run(command + ["--checkpointing", args.checkpointing], check=True,
                              capture_output=True, text=True)
        rows[variant] = row = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"{variant:8s} peak RSS {row['peak_rss_bytes'] / 2**20:7.0f} MiB, "
              f"{row['seconds_per_step']:.1f} s/step, losses {row['losses']}")
    plain, chunked = rows["plain"], rows["chunked"]
    gap = max(abs(a - b) for a, b in zip(plain["losses"], chunked["losses"], strict=True))
    print(f"chunked / plain peak RSS: {chunked['peak_rss_bytes'] / plain['peak_rss_bytes']:.3f}x;"
          f" largest loss difference {gap:.2e} (bf16 autocast: {plain['bf16']}, activation "
          f"checkpointing: {args.checkpointing})")
    output = args.output or f"benchmarks/results/loss_memory_{args.checkpointing}.json"
    write_json_atomic(output, {"settings": vars(args), **rows})
    print(f"written: {output}")


if __name__ == "__main__":
    main()
