"""The Python entry points: load any model, compress one to a folder, measure perplexity."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from . import hub, mixing
from .atomic import check_output_dir
from .compression import STORAGE_DTYPE, SketchConfig, compress_model
from .data.tasks import calibration_source
from .data.text import calibration_texts, heldout_texts, read_text_file, token_windows
from .devices import resolve_device
from .errors import SketchtuneError
from .evaluate.perplexity import perplexity
from .memory import large_buffers_off_the_heap, peak_rss_bytes
from .mixing import MixConfig
from .serving import serving_disabled
from .sources import load_dense, load_tokenizer, open_source_streaming
from .streaming import StreamingSource
from .task_sketch import apply_task_sketch, load_task_sketch


def load(
    path: str | os.PathLike,
    task_sketch: str | os.PathLike | None = None,
    dtype: torch.dtype = torch.float32,
    values_dtype: torch.dtype | None = None,
    serve: bool = True,
) -> PreTrainedModel:
    """A sketched model folder, with a task sketch's values applied when one is given.

    The defaults are the fast inference path, as `from_pretrained` gives it: tables as stored
    (`values_dtype=None`, bf16: the CPU GEMV reads them directly) and, with `serve`, on a CPU
    model `serving.serve` (embeddings and head in bf16 as stored with fp32 activations around
    them; the decode thread count chosen by timing). Training needs nothing else:
    `model.train()` turns the tables into fp32 masters, and the head's backward is the fp32
    one. `serve=False` gives the model exactly as stored."""
    with contextlib.nullcontext() if serve else serving_disabled():
        model = hub.load(path, dtype=dtype, values_dtype=values_dtype)
    if task_sketch is not None:
        apply_task_sketch(model, load_task_sketch(task_sketch))
    return model


def load_any(
    name_or_path: str,
    task_sketch: str | os.PathLike | None = None,
    dtype: torch.dtype = torch.float32,
    values_dtype: torch.dtype | None = None,
    serve: bool = True,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A sketched model folder (plus optional task sketch; see `load`), or any dense source
    model."""
    if Path(name_or_path).is_dir() and hub.sketch_config_of(name_or_path) is not None:
        tokenizer = load_tokenizer(name_or_path)  # cheap: a bad one fails before the model loads
        return load(name_or_path, task_sketch, dtype, values_dtype, serve), tokenizer
    if task_sketch is not None:
        raise SketchtuneError(f"{name_or_path} is not a sketched model: task sketches need one")
    return load_dense(name_or_path, dtype=dtype)


def compress(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    config: SketchConfig | None = None,
    texts: list[str] | None = None,
    samples: int = 32,
    seq_len: int = 512,
    seed: int = 0,
    batch_size: int = 4,
    progress: bool = True,
    before_block: Callable[[int], None] | None = None,
    device: str | torch.device | None = None,
) -> PreTrainedModel:
    """Sketch `model` in place from calibration `texts` (default: the shipped calibration text).
    `before_block` is `compress_model`'s hook (streaming fills each block there); `device`
    where the blocks are sketched (`devices.resolve_device`; default: where the model is)."""
    config = config or SketchConfig()
    windows = None
    if config.data_aware:
        windows = token_windows(tokenizer, texts or calibration_texts(), samples, seq_len, seed)
    compress_model(
        model, windows, config, batch_size=batch_size, progress=progress,
        before_block=before_block,
        device=None if device is None else resolve_device(device),
    )
    return model


def compress_to_folder(
    source: str,
    output: str | os.PathLike,
    config: SketchConfig,
    samples: int = 32,
    seq_len: int = 512,
    calib: str | None = None,
    seed: int = 0,
    force: bool = False,
    progress: bool = True,
    device: str | torch.device = "auto",
    max_shard_size: int | str = hub.DEFAULT_MAX_SHARD_SIZE,
) -> dict:
    """Sketch `source` into `output` on `device`. Returns a summary with timings.

    Safetensors sources are streamed: only the embeddings, the head and the block being sketched
    are ever dense in memory. Others are loaded whole first.
    """
    check_output_dir(output, force)
    device = resolve_device(device)  # a bad or absent device fails before any work
    texts = calibration_source(calib) if calib else None
    opened = open_source_streaming(source)
    if opened is None:
        (model, tokenizer), before_block = load_dense(source), None
    else:
        stream, tokenizer = opened
        stream.load_outside_blocks()
        model, before_block = stream.model, _streamed_blocks(stream)
    start = time.perf_counter()
    with large_buffers_off_the_heap():  # each block's MB-sized temporaries go back when freed
        compress(
            model, tokenizer, config, texts, samples, seq_len, seed, progress=progress,
            before_block=before_block, device=device,
        )
    seconds = time.perf_counter() - start
    if opened is not None:
        # Released while the blocks were sketched; read back as they are saved (rounded exactly
        # as round_to_storage rounds), so the save makes no copy of a 1 GB fp32 embedding.
        opened[0].load_outside_blocks(STORAGE_DTYPE)
        opened[0].check_complete()
    hub.save_sketched(model, tokenizer, output, force=force, max_shard_size=max_shard_size)
    return {
        "source": source,
        "output": str(output),
        "seconds": round(seconds, 1),
        "sketched_layers": len(hub.format_of(model).modules),
        "bytes_on_disk": sum(f.stat().st_size for f in hub.checkpoint_files(output)),
        "streamed": opened is not None,
        "device": str(device),
        "peak_rss_mb": round(peak_rss_bytes() / 2**20, 1),
    }


def _streamed_blocks(stream: StreamingSource) -> Callable[[int], None]:
    """`compress_model`'s `before_block` for a streamed source: the first block's inputs are
    captured by then, so the embeddings and head wait on meta for the save; then each block is
    read in turn."""

    def before_block(index: int) -> None:
        if index == 0:
            stream.release_outside_blocks()
        stream.load_block(index)

    return before_block


def mix_to_folder(
    folders: list[str | os.PathLike],
    output: str | os.PathLike,
    config: MixConfig,
    force: bool = False,
    max_shard_size: int | str = hub.DEFAULT_MAX_SHARD_SIZE,
) -> dict:
    """One sketched folder from several of the same base: each projection from the folder that
    `mixing.allocate` picks under `config.bits_per_weight`. Returns the plan's summary."""
    check_output_dir(output, force)
    plan = mixing.plan_mix([mixing.open_candidate(f) for f in folders], config.bits_per_weight)
    model = mixing.mix(plan)
    tokenizer = load_tokenizer(plan.candidates[0].folder)
    hub.save_sketched(model, tokenizer, output, force=force, max_shard_size=max_shard_size)
    return {"output": str(output), **plan.summary()}


def heldout_perplexity(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    samples: int = 32,
    seq_len: int = 512,
    text_path: str | None = None,
    progress: bool = True,
) -> dict:
    """Perplexity on held-out text that calibration never uses (or on a user's text file)."""
    texts = read_text_file(text_path) if text_path else heldout_texts()
    windows = token_windows(tokenizer, texts, samples, seq_len, seed=0)
    return perplexity(model, windows, progress=progress)
