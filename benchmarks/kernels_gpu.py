"""Issue-6 targets: the Triton kernels on a CUDA GPU against cuBLAS bf16, in one run.

Prints, for Llama-7B-shaped layers (d_out x d_in: 4096x4096, 11008x4096, 4096x11008; 4 bits,
gpr 4 unless told), the sketch kernel time against dense bf16 `F.linear` at 1, 8, 512 and 2048
tokens, and both gradient kernels against their dense GEMMs at the largest token count; the
device-to-device copy bandwidth and the floor it implies for one token (bytes read / bandwidth);
"GB/s achieved" (least bytes a kernel must move / its time) for every kernel. Then one training
step of a ~1B Llama-shaped model with random weights, sketched (random codes and tables) against
PEFT LoRA on the bf16 dense model at the matched number of trainable parameters: step time and
peak memory as ratios. Writes benchmarks/results/kernels_gpu.json.

Kernel times come from CUDA graphs replaying one call per copy of the layer, with enough copies
to exceed four times the L2 cache, so every call reads its weights from HBM as in a real model
and no Python launch overhead is counted. Training steps are timed eagerly.

    .venv/bin/python benchmarks/kernels_gpu.py [--sweep] [--skip-train] [--batch 4 --seq 1024]
"""

from __future__ import annotations

import argparse
import gc
import math
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F

from sketchtune import kernels
from sketchtune.format import SketchedWeight, pack_codes
from sketchtune.kernels import triton as gpu

LAYERS = ((4096, 4096), (11008, 4096), (4096, 11008))  # (d_out, d_in): q/o, gate/up, down


def per_call_seconds(calls: list[Callable[[], object]], replays: int = 20) -> float:
    """Median seconds per call of `calls`, captured in order in one CUDA graph and replayed."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # compile, autotune workspaces, allocate before capture
        for call in calls:
            call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    graph.replay()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del graph
    return statistics.median(times) / len(calls)


def copy_bandwidth() -> float:
    """Bytes per second of a 1 GiB device-to-device copy (read + write)."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    seconds = per_call_seconds([partial(dst.copy_, src)] * 4)
    return 2 * src.numel() / seconds


def copies_beyond_l2(nbytes: int) -> int:
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    return max(1, min(64, math.ceil(4 * l2 / nbytes)))


def random_sketch(d_out: int, d_in: int, bits: int, gpr: int) -> tuple[torch.Tensor, torch.Tensor]:
    codes = torch.randint(0, 1 << bits, (d_out, d_in), dtype=torch.uint8, device="cuda")
    return pack_codes(codes, bits), 0.02 * torch.randn(d_out, gpr, 1 << bits, device="cuda")


def bench_layer(d_out: int, d_in: int, args, bandwidth: float) -> list[dict]:
    """Sketch kernels vs dense bf16 on one layer shape, at every token count of args.tokens."""
    from sketchtune.kernels.triton.input_grad import lut_input_grad
    from sketchtune.kernels.triton.values_grad import lut_values_grad

    bits, gpr = args.bits, args.gpr
    sketch_bytes = d_out * d_in * bits // 8 + d_out * gpr * (4 << bits)  # codes + fp32 tables
    dense_bytes = d_out * d_in * 2
    copies = copies_beyond_l2(sketch_bytes)
    sketches = [random_sketch(d_out, d_in, bits, gpr) for _ in range(copies)]
    denses = [
        0.02 * torch.randn(d_out, d_in, device="cuda", dtype=torch.bfloat16)
        for _ in range(copies_beyond_l2(dense_bytes))
    ]
    rows = []

    def record(kernel: str, tokens: int, sketch_calls, dense_calls, io_bytes: int) -> None:
        t_sketch, t_dense = per_call_seconds(sketch_calls), per_call_seconds(dense_calls)
        row = {
            "layer": f"{d_out}x{d_in}", "kernel": kernel, "tokens": tokens,
            "sketch_ms": t_sketch * 1e3, "dense_ms": t_dense * 1e3,
            "speedup_vs_dense": t_dense / t_sketch,
            "sketch_gb_per_s": (sketch_bytes + io_bytes) / t_sketch / 1e9,
            "dense_gb_per_s": (dense_bytes + io_bytes) / t_dense / 1e9,
            "sketch_tflops": 2 * tokens * d_out * d_in / t_sketch / 1e12,
        }
        if tokens == 1:
            row["floor_ms"] = (sketch_bytes + io_bytes) / bandwidth * 1e3
            row["x_floor"] = row["sketch_ms"] / row["floor_ms"]
            row["dense_floor_ms"] = (dense_bytes + io_bytes) / bandwidth * 1e3
        rows.append(row)
        line = (
            f"  {kernel:12s} {tokens:5d} tok  sketch {row['sketch_ms']:8.4f} ms  "
            f"dense {row['dense_ms']:8.4f} ms  x{row['speedup_vs_dense']:5.2f}  "
            f"GB/s achieved {row['sketch_gb_per_s']:7.1f} (dense {row['dense_gb_per_s']:7.1f})  "
            f"{row['sketch_tflops']:6.1f} TFLOP/s"
        )
        if tokens == 1:
            line += f"  floor {row['floor_ms']:.4f} ms ({row['x_floor']:.2f}x floor)"
        print(line, flush=True)

    print(f"layer {d_out}x{d_in} (d_out x d_in), {bits} bits, gpr {gpr}: sketch "
          f"{sketch_bytes / 1e6:.1f} MB x{len(sketches)} copies, dense bf16 "
          f"{dense_bytes / 1e6:.1f} MB x{len(denses)}", flush=True)
    for tokens in args.tokens:
        x = torch.randn(tokens, d_in, device="cuda", dtype=torch.bfloat16)
        record(
            "forward", tokens,
            [partial(kernels.lut_linear, x, c, v, bits) for c, v in sketches],
            [partial(F.linear, x, w) for w in denses],
            tokens * (d_in + d_out) * 2,
        )
    tokens = max(args.tokens)
    x = torch.randn(tokens, d_in, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn(tokens, d_out, device="cuda", dtype=torch.bfloat16)
    record(
        "input_grad", tokens,
        [partial(lut_input_grad, dy, c, v, bits) for c, v in sketches],
        [partial(torch.matmul, dy, w) for w in denses],
        tokens * (d_in + d_out) * 2,
    )
    record(
        "values_grad", tokens,
        [partial(lut_values_grad, dy, x, c, v, bits) for c, v in sketches],
        [partial(torch.matmul, dy.T, x) for _ in denses],  # dense dW = dYᵀ X
        tokens * (d_in + d_out) * 2,
    )
    return rows


def sweep_layer(d_out: int, d_in: int, args) -> list[dict]:
    """Tile sizes of the GEMV (1 and 8 tokens) and the GEMM (largest token count) on one shape."""
    import triton

    from sketchtune.kernels.triton.gemm import lut_gemm
    from sketchtune.kernels.triton.gemv import gemv_config, lut_gemv

    bits, gpr = args.bits, args.gpr
    nbytes = d_out * d_in * bits // 8 + d_out * gpr * (4 << bits)
    sketches = [random_sketch(d_out, d_in, bits, gpr) for _ in range(copies_beyond_l2(nbytes))]
    found = []
    for tokens in (1, 8):
        x = torch.randn(tokens, d_in, device="cuda", dtype=torch.bfloat16)
        default = gemv_config(tokens, d_out, d_in, x.device)
        timed = []
        for block_n in (4, 8, 16, 32):
            for block_k in (64, 128, 256, 512):
                if triton.next_power_of_2(tokens) * block_n * block_k > 16384:
                    continue
                for split_k in (1, 2, 4):
                    run = partial(lut_gemv, block_n=block_n, block_k=block_k, split_k=split_k)
                    calls = [partial(run, x, c, v, bits) for c, v in sketches]
                    timed.append((per_call_seconds(calls), (block_n, block_k, split_k)))
        timed.sort()
        found.append(sweep_row("gemv", d_out, d_in, tokens, timed, default, nbytes))
    tokens = max(args.tokens)
    x = torch.randn(tokens, d_in, device="cuda", dtype=torch.bfloat16)
    timed = []
    for block_m, block_n, block_k, warps in (
        (128, 128, 32, 8), (128, 64, 64, 8), (64, 128, 32, 4), (128, 128, 64, 8),
        (64, 64, 64, 4), (128, 256, 32, 8), (256, 128, 32, 8),
    ):
        run = partial(lut_gemm, block_m=block_m, block_n=block_n, block_k=block_k,
                      num_warps=warps)
        calls = [partial(run, x, c, v, bits) for c, v in sketches]
        timed.append((per_call_seconds(calls), (block_m, block_n, block_k, warps)))
    timed.sort()
    found.append(sweep_row("gemm", d_out, d_in, tokens, timed, (128, 128, 32, 8), nbytes))
    return found


def sweep_row(kernel: str, d_out: int, d_in: int, tokens: int, timed, default, nbytes) -> dict:
    best_s, best = timed[0]
    default_s = next((s for s, cfg in timed if cfg == tuple(default)), float("nan"))
    print(f"  sweep {kernel} {d_out}x{d_in} {tokens:5d} tok: best {best} {best_s * 1e3:.4f} ms "
          f"({nbytes / best_s / 1e9:.0f} GB/s), default {tuple(default)} "
          f"{default_s * 1e3:.4f} ms", flush=True)
    return {"kernel": kernel, "layer": f"{d_out}x{d_in}", "tokens": tokens, "best": best,
            "best_ms": best_s * 1e3, "default": list(default), "default_ms": default_s * 1e3}


def llama_1b(seq: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=16,
        num_key_value_heads=16, vocab_size=32000, max_position_embeddings=max(seq, 2048),
        use_cache=False,
    )
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config)
    return model.to(torch.bfloat16)


def sketch_in_place(model: torch.nn.Module, bits: int, gpr: int) -> list[torch.nn.Parameter]:
    """Swap every block projection for a SketchLinear with random codes; return the tables."""
    from sketchtune.baselines import block_linears
    from sketchtune.layers import SketchLinear

    for param in model.parameters():
        param.requires_grad_(False)
    trainable = []
    for name, linear in block_linears(model).items():
        packed, values = random_sketch(linear.out_features, linear.in_features, bits, gpr)
        layer = SketchLinear.from_sketch(SketchedWeight(packed, values, bits, linear.in_features))
        layer.values.requires_grad_(True)
        trainable.append(layer.values)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer)
    return trainable


def train_steps(model, params, ids: torch.Tensor, steps: int) -> list[float]:
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
    times = []
    for _ in range(steps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def train_comparison(args) -> dict:
    """One method at a time on a fresh ~1B Llama: step time and peak memory from the same point
    (model built, before the first step)."""
    from sketchtune.baselines import lora_model, matched_lora_rank

    ids = torch.randint(0, 32000, (args.batch, args.seq), device="cuda")
    results = {}
    for method in ("sketch", "lora"):
        model = llama_1b(args.seq)
        rank = matched_lora_rank(model, args.gpr, args.bits)
        if method == "sketch":
            params = sketch_in_place(model, args.bits, args.gpr)
        else:
            model = lora_model(model, rank)
            params = [p for p in model.parameters() if p.requires_grad]
        model.train()
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        held = torch.cuda.memory_allocated()
        times = train_steps(model, params, ids, args.warmup + args.steps)[args.warmup:]
        step = statistics.median(times)
        results[method] = {
            "trainable_parameters": sum(p.numel() for p in params),
            "lora_rank": rank if method == "lora" else None,
            "step_seconds": step,
            "tokens_per_second": ids.numel() / step,
            "model_bytes": held,
            "peak_bytes": torch.cuda.max_memory_allocated(),
        }
        r = results[method]
        print(f"train {method:6s} {r['trainable_parameters'] / 1e6:6.1f}M trainable  "
              f"{step * 1e3:8.1f} ms/step  {r['tokens_per_second']:8.0f} tok/s  "
              f"model {held / 1e9:5.2f} GB  peak {r['peak_bytes'] / 1e9:5.2f} GB", flush=True)
        del model, params
        gc.collect()
        torch.cuda.empty_cache()
    s, lo = results["sketch"], results["lora"]
    results["ratios"] = {
        "step_time_sketch_over_lora": s["step_seconds"] / lo["step_seconds"],
        "peak_memory_sketch_over_lora": s["peak_bytes"] / lo["peak_bytes"],
        "model_memory_sketch_over_lora": s["model_bytes"] / lo["model_bytes"],
    }
    for name, value in results["ratios"].items():
        print(f"{name:32s} {value:.3f}")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--gpr", type=int, default=4)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 512, 2048])
    parser.add_argument("--sweep", action="store_true", help="also try GEMV/GEMM tile sizes")
    parser.add_argument("--skip-layers", action="store_true")
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--output", default="benchmarks/results/kernels_gpu.json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("kernels_gpu: no CUDA device here; this benchmark needs one", file=sys.stderr)
        sys.exit(2)
    if not gpu.available():
        print("kernels_gpu: triton is not installed (pip install 'sketchtune[triton]')",
              file=sys.stderr)
        sys.exit(2)
    import triton

    from sketchtune.atomic import write_json_atomic
    from sketchtune.kernels.triton.ops import register

    path = "sketchtune op (C++ autograd)" if register() else "torch.autograd.Function fallback"
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton "
          f"{triton.__version__}; sketch layers run through the {path}")
    report: dict = {
        "device": torch.cuda.get_device_name(), "torch": torch.__version__,
        "triton": triton.__version__, "settings": vars(args),
    }
    bandwidth = copy_bandwidth()
    report["copy_bandwidth_gb_per_s"] = bandwidth / 1e9
    print(f"device-to-device copy bandwidth {bandwidth / 1e9:8.1f} GB/s")
    if not args.skip_layers:
        report["layers"] = [row for shape in LAYERS for row in bench_layer(*shape, args, bandwidth)]
    if args.sweep:
        report["sweep"] = [row for shape in LAYERS for row in sweep_layer(*shape, args)]
    if not args.skip_train:
        report["train"] = train_comparison(args)
    print(f"wrote {write_json_atomic(args.output, report)}")


if __name__ == "__main__":
    main()
