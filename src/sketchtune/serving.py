"""Changes to a loaded model that make inference faster: they change no parameter that trains
(the tables), and training through them computes what the unchanged model computes."""

from __future__ import annotations

import contextlib
import contextvars
import time
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from .kernels import bf16_linear


class Bf16Head(nn.Linear):
    """An output head whose weight stays bf16 as stored, with activations in and out in fp32:
    `kernels.bf16_linear` (on CPU a GEMV that reads the bf16 weight directly, in fp32)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:  # training through it: the same fp32
            return F.linear(x, self.weight.to(x.dtype), self.bias)  # math, differentiable
        y = bf16_linear(x, self.weight)
        return y if self.bias is None else y + self.bias.to(y.dtype)


_COMPUTE_DTYPE_CLASSES: dict[type, type] = {}


def _reporting_compute_dtype(cls: type) -> type:
    """A subclass of `cls` whose `dtype` is the activations' dtype. transformers takes a model's
    dtype from its first floating parameter, the bf16 embedding once served, and writes it into
    config.json on `save_pretrained`: a reload would then compute in bf16."""
    if getattr(cls, "_reports_compute_dtype", False):
        return cls
    if cls not in _COMPUTE_DTYPE_CLASSES:
        _COMPUTE_DTYPE_CLASSES[cls] = type(cls.__name__, (cls,), {
            "__module__": cls.__module__, "_reports_compute_dtype": True,
            "dtype": property(lambda self: self._compute_dtype),
        })
    return _COMPUTE_DTYPE_CLASSES[cls]


def bf16_embeddings(model: PreTrainedModel) -> PreTrainedModel:
    """Keep the input embedding and the output head (tied or not) in bf16, with fp32 activations
    around them: half their bytes read per decoded token, and the head is a large share of a small
    model's (SmolLM2-135M: 28M of its 135M weights). Sketched folders store them in bf16, so the
    weights are exact; on CPU the head computes in fp32 from them (a GEMV for a few rows, an fp32
    GEMM on the widened weight past that; elsewhere its input is rounded to bf16, which moves
    logits slightly)."""
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    if getattr(model, "_bf16_embeddings", False):
        return model  # once: a second pass would round the head's fp32 input to bf16
    model._bf16_embeddings = True
    compute = embedding.weight.dtype
    for module in (embedding, head):
        if module is not None and module.weight.dtype != torch.bfloat16:
            module.weight.data = module.weight.data.bfloat16()  # tied: one shared parameter
    embedding.register_forward_hook(lambda _m, _args, out: out.to(compute))
    model._compute_dtype = compute
    model.__class__ = _reporting_compute_dtype(type(model))
    if type(head) is nn.Linear:
        head.__class__ = Bf16Head  # same module and parameters (ties hold), another forward
    elif head is not None:  # any other head: bf16 in, fp32 out
        head.register_forward_pre_hook(lambda _m, args: (args[0].bfloat16(), *args[1:]))
        head.register_forward_hook(lambda _m, _args, out: out.to(compute))
    return model


class DecodeThreads:
    """Chooses the intra-op thread count of each decode step (one new token per sequence) by
    timing the steps themselves. A parallel op waits for its slowest thread, so on a machine whose
    other jobs deschedule one of our threads, one thread can decode several times faster than
    two, while on a quiet machine two win (benchmarks/decode.py --busy measures both). The
    choices are 1, half and all of the caller's thread count; each one's step time is a moving
    average; the best runs, and every `probe_every` steps another is tried so that the choice
    follows the machine's load. Prefill, training and compiled regions are left alone, and the
    caller's thread count is restored after each step."""

    def __init__(self, probe_every: int = 16, smoothing: float = 0.25) -> None:
        self.probe_every, self.smoothing = probe_every, smoothing
        self.seconds: dict[int, float] = {}  # thread count -> smoothed step time
        self.steps = 0
        self._running: tuple[int, float] | None = None  # (caller's count, start) of this step

    def pick(self, most: int) -> int:
        choices = sorted({1, max(1, most // 2), most})
        untried = [n for n in choices if n not in self.seconds]
        if untried:
            return untried[0]
        best = min(choices, key=self.seconds.__getitem__)
        if self.steps % self.probe_every:
            return best
        others = [n for n in choices if n != best]
        return others[(self.steps // self.probe_every) % len(others)] if others else best

    def before(self, _module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        decoding = isinstance(ids, torch.Tensor) and ids.dim() == 2 and ids.shape[1] == 1
        if not decoding or torch.is_grad_enabled() or torch.compiler.is_compiling():
            return
        caller = torch.get_num_threads()
        torch.set_num_threads(self.pick(caller))
        self._running = (caller, time.perf_counter())

    def after(self, _module: nn.Module, _args: tuple, _kwargs: dict, _out: Any) -> None:
        if self._running is None:
            return
        caller, start = self._running
        self._running = None
        used, elapsed = torch.get_num_threads(), time.perf_counter() - start
        torch.set_num_threads(caller)
        previous = self.seconds.get(used, elapsed)
        self.seconds[used] = previous + self.smoothing * (elapsed - previous)
        self.steps += 1


def decode_threads(model: PreTrainedModel) -> DecodeThreads:
    """The `DecodeThreads` of `model`, attached on first call."""
    if not hasattr(model, "_decode_threads"):
        model._decode_threads = DecodeThreads()
        model.register_forward_pre_hook(model._decode_threads.before, with_kwargs=True)
        model.register_forward_hook(model._decode_threads.after, with_kwargs=True)
    return model._decode_threads


_SERVING = contextvars.ContextVar("sketchtune_serving", default=True)


@contextlib.contextmanager
def serving_disabled() -> Iterator[None]:
    """Load sketched models within this block exactly as stored, without `serve`."""
    token = _SERVING.set(False)
    try:
        yield
    finally:
        _SERVING.reset(token)


def serve(model: PreTrainedModel) -> PreTrainedModel:
    """The inference defaults every loader applies to a CPU model with fp32 dense parts (unless
    within `serving_disabled`): bf16 embeddings and head (`bf16_embeddings`) and the decode thread
    count chosen by measurement (`decode_threads`). Training is unaffected by either."""
    embedding = model.get_input_embeddings()
    if not _SERVING.get() or model.device.type != "cpu" or embedding.weight.dtype != torch.float32:
        return model
    decode_threads(model)
    return bf16_embeddings(model)
