"""Changes to a loaded model that make inference faster: they change no parameter that trains
(the tables), and training through them computes what the unchanged model computes."""

from __future__ import annotations

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
    if type(head) is nn.Linear:
        head.__class__ = Bf16Head  # same module and parameters (ties hold), another forward
    elif head is not None:  # any other head: bf16 in, fp32 out
        head.register_forward_pre_hook(lambda _m, args: (args[0].bfloat16(), *args[1:]))
        head.register_forward_hook(lambda _m, _args, out: out.to(compute))
    return model
