"""Where work runs: device names from the command line, and moving nested inputs between devices."""

from __future__ import annotations

import re
from collections.abc import Callable

import torch

from .errors import SketchtuneError

DEVICE_HELP = "auto (CUDA when present, else CPU), cpu, cuda or cuda:N"


def resolve_device(spec: str | torch.device | None) -> torch.device:
    """'auto' | 'cpu' | 'cuda' | 'cuda:N' -> a device that exists on this machine."""
    if isinstance(spec, torch.device):
        return spec
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    match = re.fullmatch(r"cuda(?::(\d+))?", spec)
    if match is None:
        raise SketchtuneError(f"device must be {DEVICE_HELP}, got {spec!r}")
    if not torch.cuda.is_available():
        raise SketchtuneError(f"device {spec} asked for, but this machine has no CUDA device")
    index = int(match.group(1) or 0)
    count = torch.cuda.device_count()
    if index >= count:
        raise SketchtuneError(f"device {spec} asked for, but this machine has {count} CUDA devices")
    return torch.device("cuda", index)


def tree_map(fn: Callable[[torch.Tensor], object], tree: object) -> object:
    """`fn` applied to every tensor inside nested tuples, lists and dicts; the rest kept as is."""
    if isinstance(tree, torch.Tensor):
        return fn(tree)
    if isinstance(tree, tuple | list):
        return type(tree)(tree_map(fn, item) for item in tree)
    if isinstance(tree, dict):
        return {key: tree_map(fn, value) for key, value in tree.items()}
    return tree


def to_device(tree: object, device: torch.device) -> object:
    """Every tensor inside `tree` on `device` (a no-op for those already there)."""
    return tree_map(lambda t: t.to(device, non_blocking=True), tree)


def free_bytes(device: torch.device) -> int | None:
    """Free memory of a CUDA device now; None where the question has no cheap answer (CPU)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return None
