"""Issue-5 end-to-end targets on SmolLM2-135M: greedy decode tokens/s and a training step.

Variants: the dense fp32 model; the sketched model with fp32 tables (as loaded for training;
lm_head = the fp32 tied embedding); with its tables as stored, bf16 (as `generate`/`eval` load it);
that with the embeddings and lm_head in bf16 (`serving.bf16_embeddings`, what `sketchtune
generate` runs); and with lm_head itself sketched to 4 bits (equal-count quantile tables, for
speed only: it changes the model's outputs). The tokens per second are the median over
--repeats decodes of --new-tokens tokens (always that many: no stop at EOS), the variants taking
turns so that the machine's slow spells fall on all of them. With --compile, the dense model and
the stored-table variants also decode through a static cache and torch.compile (as `sketchtune
generate --compile`). A profile of a short decode says where the sketched model's time goes. Then a
training step (8 x 128 tokens, forward + backward, only `values` trainable) through the fast
kernels and through the reference path, each in a process of its own: median time, and the
first step's peak resident memory above the loaded model (the reference path's cache of
unpacked codes counted in its peak).

    .venv/bin/python benchmarks/decode.py [--sketched DIR] [--new-tokens 128] [--repeats 3]

Without --sketched: /tmp/smol-g4 if it has a config.json, else /tmp/smol-sketch, made with
`.venv/bin/sketchtune compress smollm2-135m -o /tmp/smol-sketch --samples 8 --seq-len 256`.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import multiprocessing
import os
import statistics
import threading
import time
from itertools import pairwise
from pathlib import Path

import torch
from torch import nn

from sketchtune import kernels
from sketchtune.api import load_any
from sketchtune.format import SketchedWeight
from sketchtune.generate import decode_options
from sketchtune.kernels import cpu
from sketchtune.layers import SketchLinear
from sketchtune.serving import bf16_embeddings

PROMPT = "The history of the bicycle begins in the early nineteenth century, when"


def quantile_sketch(weight: torch.Tensor, bits: int = 4, gpr: int = 4) -> SketchLinear:
    """A data-free sketch: each (row, group) table holds the means of equal-count sorted bins."""
    d_out, d_in = weight.shape
    k = 1 << bits
    codes = torch.empty(d_out, d_in, dtype=torch.uint8)
    values = torch.empty(d_out, gpr, k)
    for r0 in range(0, d_out, 4096):  # (rows, gpr, group) at a time keeps the argmin small
        w = weight[r0 : r0 + 4096].detach().float().reshape(-1, gpr, d_in // gpr)
        ordered = w.sort(-1).values
        edges = torch.linspace(0, ordered.shape[-1], k + 1).round().long().tolist()
        table = torch.stack([ordered[..., a:b].mean(-1) for a, b in pairwise(edges)], -1)
        values[r0 : r0 + 4096] = table
        nearest = (w.unsqueeze(-1) - table.unsqueeze(-2)).abs().argmin(-1)
        codes[r0 : r0 + 4096] = nearest.reshape(-1, d_in).to(torch.uint8)
    return SketchLinear.from_sketch(SketchedWeight.from_codes(codes, values, bits))


def decode_seconds(model, inputs, new_tokens: int, compile: bool = False) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(
            **inputs,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=model.config.eos_token_id,
            **decode_options(compile),
        )
    elapsed = time.perf_counter() - start
    assert out.shape[1] - inputs["input_ids"].shape[1] == new_tokens
    return elapsed


def tokens_per_second(model, inputs, new_tokens: int, repeats: int, compile: bool = False) -> float:
    # Warm-up: compiling itself (its static cache is sized by the length, so the warm-up decodes
    # as many tokens as the timed runs).
    torch._dynamo.reset()
    decode_seconds(model, inputs, new_tokens if compile else 8, compile)
    return new_tokens / statistics.median(
        decode_seconds(model, inputs, new_tokens, compile) for _ in range(repeats)
    )


def eager_tokens_per_second(
    models: dict[str, nn.Module], inputs, new_tokens: int, repeats: int
) -> dict[str, float]:
    """Each model's median rate, the models taking turns within every repeat."""
    gc.collect()
    gc.freeze()  # the loaded models' objects: no collection rescans them while timing
    for model in models.values():
        decode_seconds(model, inputs, 8)  # warm-up: allocations, first kernel calls
    seconds = {name: [] for name in models}
    for _ in range(repeats):
        for name, model in models.items():
            seconds[name].append(decode_seconds(model, inputs, new_tokens))
    return {name: new_tokens / statistics.median(s) for name, s in seconds.items()}


def profile(model, inputs, new_tokens: int = 16) -> None:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        decode_seconds(model, inputs, new_tokens)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=10))


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_above_baseline(fn) -> int:
    """Peak resident memory while fn runs, minus the resident memory before it (sampled)."""
    gc.collect()
    base, peak, done = resident_bytes(), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], resident_bytes())
            time.sleep(0.001)

    watcher = threading.Thread(target=sample)
    watcher.start()
    try:
        fn()
    finally:
        done.set()
        watcher.join()
    return max(peak[0], resident_bytes()) - base


def train_step(sketched_dir: str, path: str, repeats: int, threads: int | None) -> tuple:
    """In a fresh process: median seconds of a training step through `path` ("fast" or
    "reference") and its peak resident memory above the loaded model. A process of its own per
    path, so that neither reuses memory the other's allocator kept."""
    if threads:
        torch.set_num_threads(threads)
    model, _ = load_any(sketched_dir)  # fp32 tables, as for training
    for name, param in model.named_parameters():
        param.requires_grad_(name.endswith(".values"))
    model.train()
    ids = torch.randint(
        0, model.config.vocab_size, (8, 128), generator=torch.Generator().manual_seed(0)
    )

    def step() -> None:
        model.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()

    context = kernels.reference_only() if path == "reference" else contextlib.nullcontext()
    with context:
        peak = peak_rss_above_baseline(step)  # the first step: the reference path's cache too
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
    return statistics.median(times), peak


def train_step_report(sketched_dir: str, repeats: int, threads: int | None) -> None:
    context = multiprocessing.get_context("spawn")
    results = {}
    for path in ("fast", "reference"):
        with context.Pool(1) as pool:
            results[path] = pool.apply(train_step, (sketched_dir, path, repeats, threads))
    for path, (seconds, peak) in results.items():
        print(f"train step 8x128, {path:9s} {seconds * 1e3:8.1f} ms  peak +{peak / 2**20:7.1f} MiB")
    print(f"train step speed-up {results['reference'][0] / results['fast'][0]:.2f}x")


def default_sketched() -> str:
    for folder in ("/tmp/smol-g4", "/tmp/smol-sketch"):
        if (Path(folder) / "config.json").is_file():
            return folder
    raise SystemExit("no sketched SmolLM2 folder: pass --sketched or run sketchtune compress")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sketched", default=None)
    parser.add_argument("--dense", default="smollm2-135m")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--no-train", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="default: torch's")
    parser.add_argument("--compile", action="store_true",
                        help="also time compiled decodes (static cache; about a minute each)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    sketched_dir = args.sketched or default_sketched()
    print(
        f"threads {torch.get_num_threads()}, CPU kernels "
        f"{cpu.isa() if cpu.available() else 'unavailable'}, sketched model {sketched_dir}"
    )

    dense, tokenizer = load_any(args.dense)
    inputs = tokenizer(PROMPT, return_tensors="pt")
    head_weight = dense.get_output_embeddings().weight
    variants = {"dense fp32": dense.eval()}
    sketched, _ = load_any(sketched_dir)  # fp32 tables, as for training
    sketched.eval()
    variants["sketched, fp32 tables, lm_head fp32"] = sketched
    stored, _ = load_any(sketched_dir, values_dtype=None)  # bf16 tables, as for inference
    stored.eval()
    variants["sketched, bf16 tables, lm_head fp32"] = stored
    bf16_head = bf16_embeddings(copy.deepcopy(stored))  # as `sketchtune generate` runs it
    variants["sketched, bf16 tables, bf16 embeddings + lm_head"] = bf16_head
    sketched_head = copy.deepcopy(stored)
    sketched_head.lm_head = quantile_sketch(head_weight)
    sketched_head.lm_head.values = nn.Parameter(sketched_head.lm_head.values.detach().bfloat16())
    variants["sketched, bf16 tables, lm_head sketched (speed only)"] = sketched_head
    rates = eager_tokens_per_second(variants, inputs, args.new_tokens, args.repeats)

    if args.compile:  # static cache + torch.compile for the dense model and the stored tables
        for name in list(variants)[:1] + list(variants)[2:]:
            rates[f"{name}, compiled"] = tokens_per_second(
                variants[name], inputs, args.new_tokens, args.repeats, compile=True
            )
    del variants, dense

    base = rates["dense fp32"]
    base_compiled = rates.get("dense fp32, compiled")
    for name, rate in rates.items():
        versus = f"{rate / base:5.2f}x dense fp32"
        if base_compiled:
            versus += f"  {rate / base_compiled:5.2f}x dense fp32 compiled"
        print(f"{name:60s} {rate:7.2f} tokens/s  {1e3 / rate:7.2f} ms/token  {versus}")
    if not args.no_profile:
        print("where the time goes (sketched, lm_head sketched; profiler adds overhead):")
        profile(sketched_head, inputs)
    if not args.no_train:
        train_step_report(sketched_dir, args.repeats, args.threads)


if __name__ == "__main__":
    main()
