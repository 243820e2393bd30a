"""The SketchTune authors' published checkpoints as sketchtune folders.

Their base files (`llama-3-8b-int4-gpr4.pkl`, ...) are a plain `pickle.dump` of a dict
  module name -> (grid, codes)
  grid:  (rows, gpr, 2**bits) fp16/bf16, or (rows, 2**bits) for gpr 1
  codes: (rows, gpr, cols_per_group // 2) uint8, or (rows, cols // 2) for gpr 1: two codes per
         byte, high nibble first (column 2i in the high nibble, 2i + 1 in the low one)
and the dense base model supplies everything else. Their fine-tuned checkpoints
(`sketched_params.pkl`) are a dict module name -> grid. Their loader casts each grid to the
model's dtype (bf16) before use, so the tables here are `grid.to(torch.bfloat16)`, exactly.
Pickles are read with `safe_pickle`, which never runs code from the file.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from .atomic import check_output_dir
from .compression import find_decoder_blocks
from .errors import SketchtuneError
from .format import (
    SUPPORTED_BITS,
    SUPPORTED_GPR,
    FormatError,
    SketchedWeight,
    SketchFormatConfig,
)
from .hub import fingerprint_of, format_of, load, save_sketched
from .layers import SketchLinear, sketched_layers
from .safe_pickle import load_tensor_pickle
from .sources import load_dense, open_source_streaming
from .task_sketch import TaskSketch, check_fits, save_task_sketch

SOURCE = "published SketchTune checkpoint"
GRID_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def read_published(path: str | os.PathLike, with_codes: bool) -> dict[str, object]:
    """Their dict, its structure checked: name -> (grid, codes), or name -> grid."""
    entries = load_tensor_pickle(path)
    if not isinstance(entries, dict) or not entries:
        kind = "an empty dict" if isinstance(entries, dict) else f"a {type(entries).__name__}"
        raise SketchtuneError(f"{path} holds {kind}, not a dict of module name -> sketch")
    for name, entry in entries.items():
        if not isinstance(name, str):
            raise SketchtuneError(f"{path} has a key {name!r} that is not a module name")
        pair = isinstance(entry, tuple | list) and len(entry) == 2
        if pair and all(isinstance(t, torch.Tensor) for t in entry):
            if not with_codes:
                raise SketchtuneError(
                    f"{path} holds (grid, codes) pairs: a base checkpoint (convert it with --base)"
                )
        elif isinstance(entry, torch.Tensor):
            if with_codes:
                raise SketchtuneError(
                    f"{path} holds grids only: a fine-tuned checkpoint (convert it with "
                    "--sketched and the folder converted from its base)"
                )
        else:
            want = "a (grid, codes) pair of tensors" if with_codes else "a grid tensor"
            raise SketchtuneError(f"{path}: {name} holds a {type(entry).__name__}, not {want}")
    return entries


def grid_values(name: str, grid: torch.Tensor) -> torch.Tensor:
    """Their grid -> our (rows, gpr, 2**bits) table, cast to bf16 as their loader casts it."""
    if grid.dtype not in GRID_DTYPES:
        raise SketchtuneError(f"grid of {name} is {grid.dtype}, not fp16, bf16 or fp32")
    if grid.dim() == 2:
        grid = grid.unsqueeze(1)  # gpr 1
    if grid.dim() != 3:
        raise SketchtuneError(f"grid of {name} has shape {tuple(grid.shape)}: 2 or 3 dims expected")
    rows, gpr, entries = grid.shape
    if gpr not in SUPPORTED_GPR or entries not in [1 << b for b in SUPPORTED_BITS]:
        raise SketchtuneError(
            f"grid of {name} has shape {tuple(grid.shape)}: groups per row must be one of "
            f"{SUPPORTED_GPR} and the table size one of {[1 << b for b in SUPPORTED_BITS]}"
        )
    values = grid.to(torch.bfloat16)
    if not torch.isfinite(values).all():
        raise SketchtuneError(f"grid of {name} has non-finite values (NaN or inf) in bf16")
    return values


def unpack_published_codes(
    name: str, codes: torch.Tensor, values: torch.Tensor, cols: int
) -> torch.Tensor:
    """Their packed codes (high nibble first, per group) -> (rows, cols) uint8 code indices."""
    rows, gpr, entries = values.shape
    if codes.dtype != torch.uint8:
        raise SketchtuneError(f"codes of {name} are {codes.dtype}, not uint8")
    if codes.dim() == 2:
        codes = codes.unsqueeze(1)  # gpr 1
    want = (rows, gpr, cols // gpr // 2)
    if tuple(codes.shape) != want or cols % (2 * gpr):
        raise SketchtuneError(
            f"codes of {name} have shape {tuple(codes.shape)}, its grid {tuple(values.shape)} "
            f"and {cols} input columns need {want}"
        )
    pairs = torch.stack((codes >> 4, codes & 0x0F), dim=-1)  # (rows, gpr, cols/gpr/2, 2)
    unpacked = pairs.reshape(rows, cols)
    if unpacked.numel() and int(unpacked.max()) >= entries:
        raise SketchtuneError(f"codes of {name} index past its {entries}-entry tables")
    return unpacked


def _projections(model: nn.Module) -> dict[str, nn.Linear]:
    """Every Linear inside the decoder blocks, by name relative to the model."""
    blocks_name, blocks = find_decoder_blocks(model)
    return {f"{blocks_name}.{n}": m for n, m in blocks.named_modules()
            if isinstance(m, nn.Linear)}


def _projection(linears: dict[str, nn.Linear], name: str, rows: int) -> nn.Linear:
    linear = linears.get(name)
    if linear is None:
        raise SketchtuneError(
            f"checkpoint module {name} is not a Linear projection of the base's decoder blocks"
        )
    if linear.out_features != rows:
        raise SketchtuneError(
            f"grid of {name} has {rows} rows, the base's Linear has {linear.out_features} outputs"
        )
    return linear


def published_sketches(
    model: nn.Module, entries: dict[str, object]
) -> dict[str, SketchedWeight]:
    """Each (grid, codes) of `entries` checked against `model`'s Linear of that name and turned
    into our packed form. Takes the entries out of the dict as it goes (their bytes are freed)."""
    linears = _projections(model)
    sketches = {}
    for name in sorted(entries):
        grid, codes = entries.pop(name)
        values = grid_values(name, grid)
        linear = _projection(linears, name, values.shape[0])
        unpacked = unpack_published_codes(name, codes, values, linear.in_features)
        bits = values.shape[2].bit_length() - 1
        try:
            sketches[name] = SketchedWeight.from_codes(unpacked, values.float(), bits)
        except FormatError as exc:
            raise SketchtuneError(f"{name}: {exc}") from None
    settings = {(s.bits, s.gpr) for s in sketches.values()}
    if len(settings) != 1:
        raise SketchtuneError(f"the checkpoint mixes (bits, gpr) settings {sorted(settings)}")
    return sketches


def install_sketches(
    model: nn.Module, sketches: dict[str, SketchedWeight], file: str,
    load_block: Callable[[int], None] | None = None,
) -> SketchFormatConfig:
    """Swap each named Linear for its SketchLinear (bias kept) and record the folder's config.
    `load_block(index)`, when given, fills decoder block `index` first (streamed bases). Takes
    the sketches out of the dict as it goes (each layer holds its own copy of the codes)."""
    first = next(iter(sketches.values()))
    config = SketchFormatConfig(
        bits=first.bits,
        groups_per_row=first.gpr,
        modules=sorted(sketches),
        dense_projections=sorted(set(_projections(model)) - set(sketches)),
        learning={"source": SOURCE, "file": file},
    )
    blocks_name, blocks = find_decoder_blocks(model)  # before the swap: it looks for Linears
    for index in range(len(blocks)):
        if load_block is not None:
            load_block(index)
        for name in [n for n in sketches if n.startswith(f"{blocks_name}.{index}.")]:
            bias = model.get_submodule(name).bias
            bias = None if bias is None else bias.detach()
            model.set_submodule(name, SketchLinear.from_sketch(sketches.pop(name), bias))
    model.config.quantization_config = config
    return config


def convert_base(
    checkpoint: str | os.PathLike, base: str, output: str | os.PathLike, force: bool = False
) -> dict:
    """A published base file + the dense model it was made from -> a sketched folder."""
    check_output_dir(output, force)
    entries = read_published(checkpoint, with_codes=True)
    opened = open_source_streaming(base)
    if opened is None:
        (model, tokenizer), load_block = load_dense(base, dtype=torch.bfloat16), None
    else:  # a meta skeleton: only one dense block is ever read at a time
        stream, tokenizer = opened
        model, load_block = stream.model, stream.load_block
    sketches = published_sketches(model, entries)  # checked before any dense weight is read
    if opened is not None:
        opened[0].load_outside_blocks()
    config = install_sketches(model, sketches, Path(checkpoint).name, load_block)
    if opened is not None:
        opened[0].check_complete()
    save_sketched(model, tokenizer, output, force=force)
    return {
        "source": str(checkpoint),
        "base": base,
        "output": str(output),
        "sketched_layers": len(config.modules),
        "dense_projections": len(config.dense_projections),
        "bits": config.bits,
        "gpr": config.groups_per_row,
        "fingerprint": model.config.quantization_config.fingerprint,
    }


def task_sketch_from_published(
    model: nn.Module, grids: dict[str, object], file: str
) -> TaskSketch:
    """Fine-tuned grids -> a task sketch for the sketched `model` (each table shape checked)."""
    layers = sketched_layers(model)
    values = {}
    for name in sorted(grids):
        table = grid_values(name, grids[name])
        layer = layers.get(name)
        if layer is None:
            raise SketchtuneError(f"checkpoint module {name} is not a sketched layer of the base")
        if table.shape != layer.values.shape:
            raise SketchtuneError(
                f"grid of {name} has shape {tuple(table.shape)}, the base's table is "
                f"{tuple(layer.values.shape)}"
            )
        values[name] = table.float()
    missing = sorted(set(layers) - set(values))
    if missing:
        raise SketchtuneError(
            f"the checkpoint has no grid for {len(missing)} sketched layers of the base "
            f"({missing[0]}, ...)"
        )
    base = format_of(model)
    sketch = TaskSketch(
        values, fingerprint_of(model), base.bits, base.groups_per_row,
        {"source": SOURCE, "file": file},
    )
    check_fits(model, sketch)
    return sketch


def convert_task_sketch(
    checkpoint: str | os.PathLike, sketched: str | os.PathLike, output: str | os.PathLike,
    force: bool = False,
) -> dict:
    """A published fine-tuned checkpoint + the folder converted from its base -> a task sketch."""
    check_output_dir(output, force)
    grids = read_published(checkpoint, with_codes=False)
    model = load(sketched, dtype=torch.bfloat16, values_dtype=None)
    sketch = task_sketch_from_published(model, grids, Path(checkpoint).name)
    save_task_sketch(sketch, output, force=force)
    return {
        "source": str(checkpoint),
        "base": str(sketched),
        "output": str(output),
        "layers": len(sketch.values),
        "base_fingerprint": sketch.base_fingerprint,
    }
