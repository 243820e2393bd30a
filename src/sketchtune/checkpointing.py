"""Activation checkpointing: what a training step keeps of each decoder block for the backward.

- "off": all that autograd saves.
- "selective": the outputs of the block's matmuls (dense, sketched, LoRA) and of attention, and
  the block's input. The backward reruns only the rest (norms, rotary embeddings, activation
  functions, casts): elementwise work, a small part of the step's compute, but most of the bytes
  autograd saves. SmolLM2-135M at 8 x 256 (`benchmarks/loss_memory.py`): see the README.
- "full": only the block's input; the backward reruns the block's whole forward.

Both rerun the same operations on the same inputs, so they give the same values as "off".
"""

from __future__ import annotations

from functools import cache
from typing import Literal

Mode = Literal["off", "selective", "full"]
MODES: tuple[Mode, ...] = ("off", "selective", "full")
FULL_ABOVE = 1_000_000_000  # weights: "auto" picks "full" above, "selective" at or below

# Ops whose outputs "selective" keeps: matmuls and attention (compute-bound, small outputs).
_KEPT_OPS = frozenset((
    "aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_scaled_mm",
    "aten::_scaled_dot_product_flash_attention",
    "aten::_scaled_dot_product_flash_attention_for_cpu",
    "aten::_scaled_dot_product_efficient_attention",
    "aten::_scaled_dot_product_cudnn_attention",
    "sketchtune::lut_linear",
))


def resolve(mode: str, weights: int) -> Mode:
    """The mode "auto" stands for at a model of `weights` weights; other modes as they are."""
    if mode == "auto":
        return "full" if weights > FULL_ABOVE else "selective"
    return mode  # type: ignore[return-value]


def checkpoint_kwargs(mode: Mode) -> dict:
    """Keyword arguments for `torch.utils.checkpoint.checkpoint` (through transformers'
    `activation_checkpointing_kwargs`) under `mode` ("selective" or "full")."""
    kwargs = {"use_reentrant": False}
    if mode == "selective":
        kwargs["context_fn"] = selective_contexts
    return kwargs


def enable(model, mode: Mode) -> None:
    """Put a transformers model (or a PEFT wrapper of one) in `mode`."""
    if mode == "off":
        model.activation_checkpointing_disable()
    else:
        model.activation_checkpointing_enable(checkpoint_kwargs(mode))


def selective_contexts():
    """The forward and recompute contexts of "selective" (one pair per checkpointed call)."""
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    return create_selective_checkpoint_contexts(_keep_matmuls)


def _keep_matmuls(ctx, op, *args, **kwargs):
    from torch.utils.checkpoint import CheckpointPolicy

    return CheckpointPolicy.MUST_SAVE if _kept(op) else CheckpointPolicy.PREFER_RECOMPUTE


@cache
def _kept(op) -> bool:
    return op.name().split(".")[0] in _KEPT_OPS  # "aten::add.Tensor" -> "aten::add"
