"""Changes to a loaded model that make inference faster: they change no parameter that trains
(the tables), and training through them computes what the unchanged model computes."""

from __future__ import annotations

import contextlib
import contextvars
import math
import time
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache, PreTrainedModel
from transformers.generation.configuration_utils import ALL_STATIC_CACHE_IMPLEMENTATIONS

from .kernels import bf16_linear


class Bf16Head(nn.Linear):
    """An output head whose weight stays bf16 as stored, with activations in and out in fp32:
    `kernels.bf16_linear` (on CPU a GEMV that reads the bf16 weight directly, in fp32)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:  # training through it, differentiable:
            if torch.is_autocast_enabled(x.device.type):  # autocast's dtype from the bf16 weight
                return F.linear(x, self.weight, self.bias)  # (no fp32 copy of a 128k head)
            return F.linear(x, self.weight.to(x.dtype), self.bias)  # the same fp32 math
        y = bf16_linear(x, self.weight)
        return y if self.bias is None else y + self.bias.to(y.dtype)


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
    model.__class__ = _served_class(type(model))  # reports fp32 as its dtype
    if type(head) is nn.Linear:
        head.__class__ = Bf16Head  # same module and parameters (ties hold), another forward
    elif head is not None:  # any other head: bf16 in, fp32 out
        head.register_forward_pre_hook(lambda _m, args: (args[0].bfloat16(), *args[1:]))
        head.register_forward_hook(lambda _m, _args, out: out.to(compute))
    return model


class ThreadChoice:
    """The thread count for one kind of step, chosen by timing: 1, half and all of the caller's
    count are each tried once, then the fastest (by a moving average of seconds per token) runs,
    and each other count is tried again after an interval that at least doubles every time it
    loses (from `probe_every` steps up to `max_interval`) and is long enough that its probes cost
    at most `probe_budget` of the time (a probe 20x slower than the best waits 19 / budget
    steps), so that a count which is ruinous on a busy machine costs almost nothing, yet is taken
    up again once the machine quiets down (a probe's time replaces the count's old figure rather
    than being averaged into it)."""

    def __init__(self, probe_every: int = 16, max_interval: int = 1024,
                 smoothing: float = 0.25, probe_budget: float = 0.03) -> None:
        self.probe_every, self.max_interval, self.smoothing = probe_every, max_interval, smoothing
        self.probe_budget = probe_budget
        self.seconds: dict[int, float] = {}  # thread count -> smoothed seconds per token
        self.interval: dict[int, int] = {}  # thread count -> steps between its probes
        self.next_probe: dict[int, int] = {}  # thread count -> step of its next probe
        self.steps = 0
        self.last_used: int | None = None

    def best(self, choices: list[int]) -> int:
        return min(choices, key=self.seconds.__getitem__)

    def pick(self, most: int) -> int:
        choices = sorted({1, max(1, most // 2), most})
        untried = [n for n in choices if n not in self.seconds]
        if untried:
            return untried[0]
        best = self.best(choices)
        due = [n for n in choices if n != best and self.next_probe.get(n, 0) <= self.steps]
        return due[0] if due else best

    def record(self, used: int, seconds_per_token: float, most: int) -> None:
        previous = self.seconds.get(used, seconds_per_token)
        if used != self.last_used:  # a probe: the old figure is stale, the new one stands
            previous = seconds_per_token
        self.seconds[used] = previous + self.smoothing * (seconds_per_token - previous)
        self.last_used = used
        choices = [n for n in sorted({1, max(1, most // 2), most}) if n in self.seconds]
        best = self.best(choices)
        if best == used:
            interval = self.probe_every
        else:
            extra = self.seconds[used] / self.seconds[best] - 1  # a probe's cost, in best steps
            interval = min(max(2 * self.interval.get(used, self.probe_every // 2),
                               math.ceil(extra / self.probe_budget)), self.max_interval)
        self.interval[used] = interval
        self.next_probe[used] = self.steps + interval
        self.steps += 1


class DecodeThreads:
    """Chooses the intra-op thread count of each inference step of a model by timing them: a
    parallel op waits for its slowest thread, so on a machine whose other jobs deschedule one of
    our threads, one thread decodes many times faster than two (benchmarks/decode.py --busy),
    while on a quiet machine two win. Prompts (several new tokens) and decode steps (one per
    sequence) keep separate choices (`ThreadChoice`). Within `generate` a step runs from one
    forward to the next, so the choice also covers generate's own ops between forwards (a
    49k-logit argmax or copy is a parallel region too); the caller's thread count comes back
    when generate returns, or after the forward outside it. Training and compiled regions are
    left alone."""

    def __init__(self) -> None:
        self.kinds = {"prefill": ThreadChoice(), "decode": ThreadChoice()}
        self._running: tuple[str, int, int, int, float] | None = None  # the step under way
        self._generate_caller: int | None = None  # the caller's count while generate runs
        self._paused = False  # within a generate that may compile: counts are left alone

    @contextlib.contextmanager
    def generating(self, govern: bool = True) -> Iterator[None]:
        """Within a `generate` call; `govern=False` (a generate that may compile its decode step)
        keeps the caller's count throughout: a compiled step guards on the thread count, and a
        count changed between steps would compile it again."""
        caller = torch.get_num_threads()
        self._generate_caller, self._paused = caller, not govern
        try:
            yield
        finally:
            self._finish(time.perf_counter())
            self._generate_caller, self._paused = None, False
            torch.set_num_threads(caller)

    def before(self, _module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        # is_compiling first: dynamo folds it, so a traced hook reads (and guards on) no state
        if torch.compiler.is_compiling() or self._paused:
            return
        now = time.perf_counter()
        self._finish(now)  # the previous step ends where this one starts
        ids = kwargs.get("input_ids", args[0] if args else None)
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.numel() == 0:
            return
        if torch.is_grad_enabled():
            return
        kind = "decode" if ids.shape[1] == 1 else "prefill"
        caller = self._generate_caller or torch.get_num_threads()
        used = self.kinds[kind].pick(caller)
        torch.set_num_threads(used)
        self._running = (kind, caller, used, ids.numel(), now)

    def after(self, _module: nn.Module, _args: tuple, _kwargs: dict, _out: Any) -> None:
        if torch.compiler.is_compiling():
            return
        if self._generate_caller is None and self._running is not None:
            caller = self._running[1]
            self._finish(time.perf_counter())
            torch.set_num_threads(caller)

    def _finish(self, now: float) -> None:
        if self._running is not None:
            kind, caller, used, tokens, start = self._running
            self._running = None
            self.kinds[kind].record(used, (now - start) / tokens, caller)


class _Served:
    """Mixed into a served model's class (`_served_class`): `dtype` is the activations' dtype
    (transformers takes a model's dtype from its first floating parameter, the bf16 embedding
    once served, and `save_pretrained` writes it into config.json: a reload would compute in
    bf16), and `generate` runs under the model's `DecodeThreads`."""

    @property
    def dtype(self) -> torch.dtype:
        compute = getattr(self, "_compute_dtype", None)
        return compute if compute is not None else super().dtype

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """transformers' generate, or for plain greedy decoding of one sequence of a Llama-family
        model the same tokens from `fast_decode.FastDecoder` (a fraction of the per-token
        overhead)."""
        from . import fast_decode

        governor = getattr(self, "_decode_threads", None)
        govern = not _may_compile(self, kwargs)
        with governor.generating(govern) if governor is not None else contextlib.nullcontext():
            if not _FAST_DECODE.get() or not fast_decode.eligible(self, args, kwargs):
                return super().generate(*args, **kwargs)
            return fast_decode.generate(self, args, kwargs, governor)


def _may_compile(model: PreTrainedModel, kwargs: dict[str, Any]) -> bool:
    """Whether transformers may compile this generate's decode step: it compiles only with a
    static-shaped cache, asked for by name or passed in."""
    config = kwargs.get("generation_config") or model.generation_config
    implementation = kwargs.get("cache_implementation", config.cache_implementation)
    cache = kwargs.get("past_key_values")
    passed = getattr(cache, "is_compileable", False) and not isinstance(cache, DynamicCache)
    return implementation in ALL_STATIC_CACHE_IMPLEMENTATIONS or passed


_SERVED_CLASSES: dict[type, type] = {}


def _served_class(cls: type) -> type:
    if issubclass(cls, _Served):
        return cls
    if cls not in _SERVED_CLASSES:
        _SERVED_CLASSES[cls] = type(cls.__name__, (_Served, cls), {"__module__": cls.__module__})
    return _SERVED_CLASSES[cls]


def decode_threads(model: PreTrainedModel) -> DecodeThreads:
    """The `DecodeThreads` of `model`, attached on first call."""
    if not hasattr(model, "_decode_threads"):
        model._decode_threads = DecodeThreads()
        model.register_forward_pre_hook(model._decode_threads.before, with_kwargs=True)
        model.register_forward_hook(model._decode_threads.after, with_kwargs=True)
        model.__class__ = _served_class(type(model))
    return model._decode_threads


_SERVING = contextvars.ContextVar("sketchtune_serving", default=True)
_FAST_DECODE = contextvars.ContextVar("sketchtune_fast_decode", default=True)


@contextlib.contextmanager
def _switched_off(switch: contextvars.ContextVar) -> Iterator[None]:
    token = switch.set(False)
    try:
        yield
    finally:
        switch.reset(token)


def fast_decode_disabled() -> contextlib.AbstractContextManager[None]:
    """Served models' `generate` runs transformers' own loop within this block (benchmarks and
    tests compare the two)."""
    return _switched_off(_FAST_DECODE)


def serving_disabled() -> contextlib.AbstractContextManager[None]:
    """Load sketched models within this block exactly as stored, without `serve`."""
    return _switched_off(_SERVING)


def serve(model: PreTrainedModel) -> PreTrainedModel:
    """The inference defaults every loader applies to a CPU model with fp32 dense parts (unless
    within `serving_disabled`): bf16 embeddings and head (`bf16_embeddings`) and the decode thread
    count chosen by measurement (`decode_threads`). Training is unaffected by either."""
    embedding = model.get_input_embeddings()
    if not _SERVING.get() or model.device.type != "cpu" or embedding.weight.dtype != torch.float32:
        return model
    decode_threads(model)
    return bf16_embeddings(model)
