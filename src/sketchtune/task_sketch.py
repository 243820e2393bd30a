"""Task sketches: the outcome of fine-tuning, i.e. only the `values` of every sketched layer.

A task sketch folder holds `values.safetensors` (fp32, one tensor per layer, named like the layer)
and `task_sketch.json` (the base model's fingerprint, bits, gpr, layer list, training settings).
Applying one copies its tables into a loaded sketched base; several can be swapped on one base.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from .atomic import atomic_directory
from .errors import SketchtuneError
from .hub import _read_safetensors, base_fingerprint
from .layers import SketchLinear

VALUES_NAME = "values.safetensors"
META_NAME = "task_sketch.json"


@dataclass
class TaskSketch:
    values: dict[str, torch.Tensor]  # layer name -> (d_out, gpr, 2**bits) fp32
    base_fingerprint: str
    bits: int
    gpr: int
    info: dict = field(default_factory=dict)  # training settings, data report, ...


def sketched_layers(model: nn.Module) -> dict[str, SketchLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, SketchLinear)}


def _fingerprint_of(model: nn.Module) -> str:
    quant = getattr(model.config, "quantization_config", None) or {}
    return quant.get("fingerprint") or base_fingerprint(model)


def extract_task_sketch(model: nn.Module, info: dict | None = None) -> TaskSketch:
    """The model's current values (a copy), tagged with its base fingerprint."""
    layers = sketched_layers(model)
    if not layers:
        raise SketchtuneError("model has no sketched layers")
    first = next(iter(layers.values()))
    values = {name: layer.values.detach().float().cpu().clone() for name, layer in layers.items()}
    return TaskSketch(values, _fingerprint_of(model), first.bits, first.gpr, dict(info or {}))


def apply_task_sketch(model: nn.Module, sketch: TaskSketch) -> None:
    """Copy a task sketch's tables into `model`; refuses a sketch made for another base."""
    fingerprint = _fingerprint_of(model)
    if sketch.base_fingerprint != fingerprint:
        raise SketchtuneError(
            f"task sketch was made for base {sketch.base_fingerprint}, "
            f"but this model is {fingerprint}"
        )
    layers = sketched_layers(model)
    if set(layers) != set(sketch.values):
        raise SketchtuneError("task sketch does not cover the same layers as this model")
    with torch.no_grad():
        for name, layer in layers.items():
            new = sketch.values[name]
            if new.dtype == layer.values.dtype:
                layer.values.copy_(new)
            else:  # e.g. a base loaded with its bf16 tables: take the fp32 tables unrounded
                layer.values = nn.Parameter(
                    new.to(layer.values.device), requires_grad=layer.values.requires_grad
                )


def write_task_sketch(sketch: TaskSketch, folder: str | os.PathLike) -> None:
    """Write into an existing folder (used inside atomic folders and trainer checkpoints)."""
    folder = Path(folder)
    values = {name: t.contiguous() for name, t in sketch.values.items()}
    save_file(values, folder / VALUES_NAME, metadata={"format": "pt", "producer": "sketchtune"})
    meta = {
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
    except (json.JSONDecodeError, KeyError) as exc:
        raise SketchtuneError(f"{meta_file} is damaged: {exc}") from None
    values = {name: t.float() for name, t in _read_safetensors(folder / VALUES_NAME).items()}
    if sorted(values) != sorted(meta.get("layers", values)):
        raise SketchtuneError(f"{folder}: values file and {META_NAME} name different layers")
    info = {k: v for k, v in meta.items()
            if k not in ("base_fingerprint", "bits", "groups_per_row", "layers")}
    return TaskSketch(values, fingerprint, bits, gpr, info)
