"""Task sketches: the outcome of fine-tuning, i.e. only the `values` of every sketched layer.

A task sketch folder holds `values.safetensors` (fp32, one tensor per layer, named like the layer)
and `task_sketch.json` (the base model's fingerprint, bits, gpr, layer list, training settings).
Applying one copies its tables into a loaded sketched base. Like PEFT's named adapters, several
can be resident on one base at once (`attach_task_sketch_switching`) and switched by name.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from types import MethodType

import torch
from safetensors.torch import save_file
from torch import nn

from .atomic import atomic_directory
from .errors import SketchtuneError
from .format import TASK_SKETCH_READABLE_VERSIONS, TASK_SKETCH_VERSION, FormatError
from .hub import fingerprint_of, format_of, read_safetensors
from .layers import sketched_layers

VALUES_NAME = "values.safetensors"
META_NAME = "task_sketch.json"


@dataclass
class TaskSketch:
    values: dict[str, torch.Tensor]  # layer name -> (d_out, gpr, 2**bits) fp32
    base_fingerprint: str
    bits: int
    gpr: int
    info: dict = field(default_factory=dict)  # training settings, data report, ...


def extract_task_sketch(model: nn.Module, info: dict | None = None) -> TaskSketch:
    """The model's current values (a copy), tagged with its base fingerprint."""
    layers = sketched_layers(model)
    if not layers:
        raise SketchtuneError("model has no sketched layers")
    first = next(iter(layers.values()))
    values = {name: layer.values.detach().float().cpu().clone() for name, layer in layers.items()}
    return TaskSketch(values, fingerprint_of(model), first.bits, first.gpr, dict(info or {}))


def check_fits(model: nn.Module, sketch: TaskSketch) -> None:
    """One error line unless `sketch` was made for this very base: fingerprint, settings, layers,
    and each table's exact shape (a broadcastable shape would otherwise be copied silently)."""
    fingerprint = fingerprint_of(model)
    if sketch.base_fingerprint != fingerprint:
        raise SketchtuneError(
            f"task sketch was made for base {sketch.base_fingerprint}, "
            f"but this model is {fingerprint}"
        )
    base = format_of(model)
    if (sketch.bits, sketch.gpr) != (base.bits, base.groups_per_row):
        raise SketchtuneError(
            f"task sketch is {sketch.bits}-bit gpr={sketch.gpr}, the base is "
            f"{base.bits}-bit gpr={base.groups_per_row}"
        )
    layers = sketched_layers(model)
    if set(layers) != set(sketch.values):
        raise SketchtuneError("task sketch does not cover the same layers as this model")
    for name, layer in layers.items():
        table = sketch.values[name]
        if table.shape != layer.values.shape:
            raise SketchtuneError(
                f"task sketch table {name} has shape {tuple(table.shape)}, the base needs "
                f"{tuple(layer.values.shape)}"
            )


def apply_task_sketch(model: nn.Module, sketch: TaskSketch) -> None:
    """Copy a task sketch's tables into `model`; refuses a sketch made for another base.

    Each layer keeps its tables in the narrower of its own dtype and the sketch's that holds the
    sketch's values exactly: fp32 tables that bf16 represents go into a bf16 base's own storage
    (same bytes, same kernel as before), others are taken unrounded, and a base's own bf16
    tables put back after a task restore its storage as loaded."""
    check_fits(model, sketch)
    with torch.no_grad():
        for name, layer in sketched_layers(model).items():
            new, held = sketch.values[name], layer.values
            if held.element_size() < new.element_size() and _exact_in(new, held.dtype):
                new = new.to(held.dtype)
            if new.dtype == held.dtype:
                held.copy_(new)
            else:
                held.data = new.to(held.device)


def _exact_in(tables: torch.Tensor, dtype: torch.dtype) -> bool:
    return torch.equal(tables.to(dtype).to(tables.dtype), tables)


def attach_task_sketch_switching(model: nn.Module) -> None:
    """Give a sketched model PEFT-style named task sketches:
    `model.load_task_sketch(path, name=None)` (resident, not applied),
    `model.set_task_sketch(name)` / `model.set_task_sketch(None)` (the base's own values, exactly),
    `model.task_sketches` (name -> TaskSketch) and `model.active_task_sketch`."""
    model.task_sketches = {}
    model.active_task_sketch = None
    model._base_task_sketch = None  # the base's tables, kept on the first switch away from them
    model.load_task_sketch = MethodType(_load_named, model)
    model.set_task_sketch = MethodType(_set_named, model)


def _load_named(model: nn.Module, path: str | os.PathLike, name: str | None = None) -> str:
    sketch = load_task_sketch(path)
    check_fits(model, sketch)
    name = name or Path(path).name
    model.task_sketches[name] = sketch
    return name


def _set_named(model: nn.Module, name: str | None) -> None:
    if name is not None and name not in model.task_sketches:
        raise SketchtuneError(
            f"no task sketch named {name!r} is loaded (loaded: {sorted(model.task_sketches)})"
        )
    if model._base_task_sketch is None:
        layers = sketched_layers(model)
        base = {n: layer.values.detach().clone() for n, layer in layers.items()}
        model._base_task_sketch = TaskSketch(
            base, fingerprint_of(model), format_of(model).bits, format_of(model).groups_per_row
        )
    apply_task_sketch(model, model.task_sketches[name] if name else model._base_task_sketch)
    model.active_task_sketch = name


def write_task_sketch(sketch: TaskSketch, folder: str | os.PathLike) -> None:
    """Write into an existing folder (used inside atomic folders and trainer checkpoints)."""
    folder = Path(folder)
    values = {name: t.contiguous() for name, t in sketch.values.items()}
    save_file(values, folder / VALUES_NAME, metadata={"format": "pt", "producer": "sketchtune"})
    meta = {
        "format_version": TASK_SKETCH_VERSION,
        "base_fingerprint": sketch.base_fingerprint,
        "bits": sketch.bits,
        "groups_per_row": sketch.gpr,
        "layers": sorted(sketch.values),
        **sketch.info,
    }
    (folder / META_NAME).write_text(json.dumps(meta, indent=2))


def save_task_sketch(sketch: TaskSketch, path: str | os.PathLike, force: bool = False) -> Path:
    with atomic_directory(path, force) as temp:
        write_task_sketch(sketch, temp)
    return Path(path)


def load_task_sketch(path: str | os.PathLike) -> TaskSketch:
    folder = Path(path)
    meta_file = folder / META_NAME
    if not meta_file.is_file():
        raise SketchtuneError(f"{folder} is not a task sketch (no {META_NAME})")
    try:
        meta = json.loads(meta_file.read_text())
        fingerprint, bits, gpr = meta["base_fingerprint"], meta["bits"], meta["groups_per_row"]
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError, KeyError, TypeError) as exc:
        raise SketchtuneError(f"{meta_file} is damaged: {type(exc).__name__}: {exc}") from None
    version = meta.get("format_version", 1)  # task sketches before versioning: version 1
    if version not in TASK_SKETCH_READABLE_VERSIONS:
        raise FormatError(
            f"task sketch format version {version!r} is not readable by this sketchtune "
            f"(it reads versions {', '.join(map(str, TASK_SKETCH_READABLE_VERSIONS))}): "
            "upgrade sketchtune"
        )
    if type(bits) is not int or type(gpr) is not int or not isinstance(fingerprint, str):
        raise SketchtuneError(f"{meta_file} is damaged: bits, groups_per_row or fingerprint")
    stored = read_safetensors(folder / VALUES_NAME)
    for name, table in stored.items():
        if table.dtype not in (torch.float32, torch.bfloat16):
            raise SketchtuneError(f"task sketch table {name} is {table.dtype}: fp32 or bf16 only")
        if not torch.isfinite(table).all():
            raise SketchtuneError(f"task sketch table {name} has non-finite values (NaN or inf)")
    values = {name: t.float() for name, t in stored.items()}
    if sorted(values) != sorted(meta.get("layers", values)):
        raise SketchtuneError(f"{folder}: values file and {META_NAME} name different layers")
    info = {k: v for k, v in meta.items()
            if k not in ("format_version", "base_fingerprint", "bits", "groups_per_row", "layers")}
    return TaskSketch(values, fingerprint, bits, gpr, info)
