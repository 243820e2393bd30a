"""Greedy decode tokens/s on SmolLM2-135M, and a training step.

Decoders: the dense fp32 model; the sketched model as `sketchtune.load` gave it before issue 22
(fp32 tables, embeddings and head); with tables, embeddings and head in bf16 as stored but torch's
thread count; what every loader gives now (that, plus the decode thread count chosen by timing,
`serving.DecodeThreads`, and greedy decoding through `fast_decode`); the same through transformers'
own generate loop (`fast_decode_disabled`); that with lm_head itself sketched to 4 bits (equal-
count quantile tables, for speed only: it changes the model's outputs); and llama.cpp on the same
GGUF (Q4_1) when llama-cpp-python is installed. Each decodes the prompt, then exactly --new-tokens
tokens (no stop at EOS); the figure is the median over --repeats, every decoder and thread count
taking turns within each repeat so that the machine's slow spells fall on all of them. With --busy
the turns run again beside one CPU-bound competing process per core, started and stopped here. With
--compile, the dense model and the default load also decode through a static cache and
torch.compile. A profile of a short decode says where the sketched model's time goes. Then a
training step (8 x 128 tokens, forward + backward, only `values` trainable) through the fast
kernels and through the reference path, each in a process of its own: median time, and the first
step's peak resident memory above the loaded model.

    .venv/bin/python benchmarks/decode.py [--sketched DIR] [--threads 1,2] [--busy]

Without --sketched: /tmp/smol-g4 if it has a config.json, else /tmp/smol-sketch, made with
`.venv/bin/sketchtune compress smollm2-135m -o /tmp/smol-sketch --samples 8 --seq-len 256`.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import importlib.util
import multiprocessing
import os
import statistics
import threading
import time
from itertools import pairwise
from pathlib import Path

import torch
from machine import machine_line
from torch import nn

from sketchtune import kernels
from sketchtune.api import load_any
from sketchtune.atomic import write_json_atomic
from sketchtune.format import SketchedWeight
from sketchtune.generate import decode_options
from sketchtune.layers import SketchLinear
from sketchtune.memory import resident_bytes
from sketchtune.serving import bf16_embeddings, fast_decode_disabled, serving_disabled

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
            **decode_options(compile, inputs["input_ids"].shape[1] + new_tokens),
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


def profile(model, inputs, new_tokens: int = 16) -> None:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        decode_seconds(model, inputs, new_tokens)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=10))


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
    model, _ = load_any(sketched_dir)  # the default load; train() makes fp32 master tables
    for name, param in model.named_parameters():
        param.requires_grad_(name.endswith(".values"))
    model.train()
    ids = torch.randint(
        0, model.config.vocab_size, (8, 128), generator=torch.Generator().manual_seed(0)
    )

    def step() -> None:
        model.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()

    context = kernels.compute_path("reference") if path == "reference" else contextlib.nullcontext()
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


class LlamaCppDecoder:
    """llama.cpp (llama-cpp-python) on a GGUF file, timed as `decode_seconds` times ours: the
    prompt, then exactly `new_tokens` greedy tokens (EOS banned), the KV cache reset each run."""

    def __init__(self, gguf: Path, threads: int) -> None:
        from llama_cpp import Llama

        self.llm = Llama(model_path=str(gguf), n_threads=threads, n_threads_batch=threads,
                         n_ctx=512, verbose=False)

    def seconds(self, new_tokens: int) -> float:
        self.llm.reset()
        start = time.perf_counter()
        out = self.llm.create_completion(PROMPT, max_tokens=new_tokens, temperature=0.0, top_k=1,
                                         logit_bias={self.llm.token_eos(): -1e9})
        elapsed = time.perf_counter() - start
        assert out["usage"]["completion_tokens"] == new_tokens
        return elapsed


def spin(parent: int) -> None:
    while os.getppid() == parent:  # a competitor outlives no killed benchmark
        for _ in range(1_000_000):
            pass


@contextlib.contextmanager
def competing_load(processes: int):
    """`processes` CPU-bound competitors (one per core: the busy machine of issue 22)."""
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=spin, args=(os.getpid(),), daemon=True)
               for _ in range(processes)]
    for worker in workers:
        worker.start()
    try:
        yield
    finally:
        for worker in workers:
            worker.terminate()
            worker.join()


def timed_turns(decoders: dict, new_tokens: int, repeats: int, threads: list[int]) -> dict:
    """Tokens/s of every (decoder, thread count): the median over `repeats`, all of them taking
    turns within each repeat so that the machine's slow spells fall on every one."""
    for decode in decoders.values():  # warm-up: allocations, first kernel calls
        decode(8, threads[-1])
    seconds: dict[tuple[str, int], list[float]] = {}
    for _ in range(repeats):
        for count in threads:
            for name, decode in decoders.items():
                seconds.setdefault((name, count), []).append(decode(new_tokens, count))
    return {key: new_tokens / statistics.median(s) for key, s in seconds.items()}


def torch_decoder(model, inputs, transformers_loop: bool = False):
    def decode(new_tokens: int, threads: int) -> float:
        torch.set_num_threads(threads)
        with fast_decode_disabled() if transformers_loop else contextlib.nullcontext():
            return decode_seconds(model, inputs, new_tokens)
    return decode


def llama_cpp_decoders(threads: list[int]) -> dict:
    from sketchtune.sources import embedded_gguf

    if importlib.util.find_spec("llama_cpp") is None:
        print("llama.cpp: llama-cpp-python is not installed (pip install '.[llamacpp]')")
        return {}
    gguf = embedded_gguf("smollm2-135m")
    per_count = {count: LlamaCppDecoder(gguf, count) for count in threads}
    return {f"llama.cpp {gguf.name}": lambda n, count: per_count[count].seconds(n)}


def report(title: str, rates: dict, threads: list[int]) -> dict:
    print(title)
    rows = {}
    for count in threads:
        base = rates[("dense fp32", count)]
        anchor = next((r for (name, c), r in rates.items() if c == count
                       and name.startswith("llama.cpp")), None)
        for (name, c), rate in rates.items():
            if c != count:
                continue
            versus = f"{rate / base:5.2f}x dense fp32"
            if anchor:
                versus += f"  {rate / anchor:5.2f}x llama.cpp"
            print(f"  {count} thread(s)  {name:58s} {rate:7.2f} tokens/s  {versus}")
            rows[f"{name} @ {count} threads"] = {
                "tokens_per_s": round(rate, 2), "over_dense_fp32": round(rate / base, 3),
                "over_llama_cpp": round(rate / anchor, 3) if anchor else None}
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sketched", default=None)
    parser.add_argument("--dense", default="smollm2-135m")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", default=str(torch.get_num_threads()),
                        help="comma-separated thread counts, each timed (default: torch's)")
    parser.add_argument("--busy", action="store_true",
                        help="time again with one CPU-bound competing process per core")
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--no-train", action="store_true")
    parser.add_argument("--compile", action="store_true",
                        help="also time compiled decodes (static cache; about a minute each)")
    parser.add_argument("--output", default="benchmarks/results/decode.json")
    args = parser.parse_args()
    threads = [int(t) for t in args.threads.split(",")]
    sketched_dir = args.sketched or default_sketched()
    print(f"{machine_line()}\nsketched model {sketched_dir}")

    dense, tokenizer = load_any(args.dense)
    inputs = tokenizer(PROMPT, return_tensors="pt")
    head_weight = dense.get_output_embeddings().weight
    models = {"dense fp32": dense.eval()}
    # before issue 22, what `sketchtune.load` gave: fp32 tables, fp32 embeddings and head
    models["sketched, fp32 tables and head (serve=False)"] = load_any(
        sketched_dir, values_dtype=torch.float32, serve=False)[0].eval()
    default = load_any(sketched_dir)[0].eval()  # what every loader gives now
    with serving_disabled():  # the same minus the decode thread choice
        fixed = bf16_embeddings(load_any(sketched_dir)[0].eval())
    models["sketched, bf16 tables and head, torch's threads"] = fixed
    models["sketchtune.load default (threads by timing)"] = default
    sketched_head = copy.deepcopy(default)
    sketched_head.lm_head = quantile_sketch(head_weight)
    sketched_head.lm_head.values = nn.Parameter(sketched_head.lm_head.values.detach().bfloat16())
    models["sketchtune.load default, lm_head sketched (speed only)"] = sketched_head
    decoders = {name: torch_decoder(model, inputs) for name, model in models.items()}
    decoders["sketchtune.load default, transformers' generate loop"] = torch_decoder(
        default, inputs, transformers_loop=True)
    decoders.update(llama_cpp_decoders(threads))

    gc.collect()
    gc.freeze()  # the loaded models' objects: no collection rescans them while timing
    results = {"machine": machine_line(), "sketched": sketched_dir, "new_tokens": args.new_tokens,
               "repeats": args.repeats}
    quiet = timed_turns(decoders, args.new_tokens, args.repeats, threads)
    results["quiet"] = report("no competing load:", quiet, threads)
    if args.busy:
        with competing_load(os.cpu_count() or 1):
            busy = timed_turns(decoders, args.new_tokens, args.repeats, threads)
        results["busy"] = report(f"{os.cpu_count()} competing CPU-bound processes:", busy, threads)
        results["busy_machine"] = machine_line()
    torch.set_num_threads(threads[-1])

    if args.compile:  # static cache + torch.compile for the dense model and the default load
        for name in ("dense fp32", "sketchtune.load default (threads by timing)"):
            rate = tokens_per_second(models[name], inputs, args.new_tokens, args.repeats, True)
            results[f"{name}, compiled"] = round(rate, 2)
            print(f"{name}, compiled: {rate:7.2f} tokens/s")
    write_json_atomic(args.output, results)
    if not args.no_profile:
        print("where the time goes (sketched, lm_head sketched; profiler adds overhead):")
        profile(sketched_head, inputs)
    del models, decoders, dense
    if not args.no_train:
        train_step_report(sketched_dir, args.repeats, threads[-1])


if __name__ == "__main__":
    main()
