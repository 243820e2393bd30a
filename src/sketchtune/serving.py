"""Inference-only changes to a loaded model: nothing here is meant to be trained."""

from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedModel

from .kernels import lut_linear
from .layers import SketchLinear


def bf16_embeddings(model: PreTrainedModel) -> PreTrainedModel:
    """Keep the input embedding and the output head (tied or not) in bf16, with fp32 activations
    around them: half their bytes read per decoded token, and the head is a large share of a small
    model's (SmolLM2-135M: 28M of its 135M weights). Sketched folders store them in bf16, so the
    weights are exact; the head's input is rounded to bf16, which moves logits slightly."""
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    compute = embedding.weight.dtype
    for module in (embedding, head):
        if module is not None and module.weight.dtype != torch.bfloat16:
            module.weight.data = module.weight.data.bfloat16()  # tied: one shared parameter
    embedding.register_forward_hook(lambda _m, _args, out: out.to(compute))
    if head is not None:
        head.register_forward_pre_hook(lambda _m, args: (args[0].bfloat16(), *args[1:]))
        head.register_forward_hook(lambda _m, _args, out: out.to(compute))
    return model


# Projections that read the same input in Llama-family blocks, by the fused module's name.
FUSABLE_GROUPS = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "gate_up_proj": ("gate_proj", "up_proj"),
}


class FusedSketchProjections(nn.Module):
    """Several sketched projections of one input stacked into one SketchLinear (their rows
    concatenate exactly: each row has its own tables), so one kernel call serves them all.

    The first part called with an input computes every part's output and keeps the others until
    each part has taken its own: no change to the model code that calls the parts one by one.
    Under torch.compile (which traces each call anyway) each part runs its own rows.
    """

    def __init__(self, parts: list[SketchLinear]) -> None:
        super().__init__()
        first = parts[0]
        self.sizes = [p.out_features for p in parts]
        self.linear = SketchLinear(
            first.in_features, sum(self.sizes), first.bits, first.gpr,
            bias=first.bias is not None, device=first.codes.device,
        )
        self.linear.codes = torch.cat([p.codes for p in parts])
        self.linear.values = nn.Parameter(
            torch.cat([p.values.detach() for p in parts]), requires_grad=False
        )
        if first.bias is not None:
            self.linear.bias = nn.Parameter(torch.cat([p.bias for p in parts]), requires_grad=False)
        self._input: torch.Tensor | None = None
        self._version = -1
        self._outputs: list[torch.Tensor] = []
        self._untaken: set[int] = set()

    def part_output(self, x: torch.Tensor, index: int) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return self._rows_of(index, x)
        if self._input is not x or self._version != x._version or index not in self._untaken:
            self._outputs = list(self.linear(x).split(self.sizes, dim=-1))  # views of (..., sum)
            self._input, self._version = x, x._version
            self._untaken = set(range(len(self.sizes)))
        out = self._outputs[index]
        self._untaken.discard(index)
        if not self._untaken:  # every part has its output: hold nothing until the next input
            self._input, self._outputs = None, []
        return out

    def _rows_of(self, index: int, x: torch.Tensor) -> torch.Tensor:
        start, n = sum(self.sizes[:index]), self.sizes[index]
        layer = self.linear
        y = lut_linear(
            x, layer.codes.narrow(0, start, n), layer.values.narrow(0, start, n), layer.bits
        )
        return y if layer.bias is None else y + layer.bias.narrow(0, start, n).to(y.dtype)


class FusedPart(nn.Module):
    """Stands where one of the fused projections was; its weights live in the fused module."""

    def __init__(self, fused: FusedSketchProjections, index: int) -> None:
        super().__init__()
        self.fused = (fused,)  # a tuple: not registered again as this module's child
        self.index = index
        self.in_features, self.out_features = fused.linear.in_features, fused.sizes[index]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fused[0].part_output(x, self.index)

    def extra_repr(self) -> str:
        return f"part {self.index} of {self.fused[0].sizes}"


def fuse_projections(model: nn.Module) -> int:
    """Fuse each group of sketched projections that read one input (q/k/v, gate/up) for
    inference; the fused module sits beside them as `qkv_proj` or `gate_up_proj`. Returns how
    many groups were fused. The model then decodes the same tokens with fewer kernel calls, but its
    state dict has the fused names: save the unfused model, not this one."""
    fused = 0
    for module in list(model.modules()):
        for fused_name, names in FUSABLE_GROUPS.items():
            parts = [getattr(module, name, None) for name in names]
            if not _fusable(parts):
                continue
            group = FusedSketchProjections(parts)
            module.add_module(fused_name, group)
            for index, name in enumerate(names):
                setattr(module, name, FusedPart(group, index))
            fused += 1
    return fused


def _fusable(parts: list[nn.Module | None]) -> bool:
    if not all(type(p) is SketchLinear for p in parts):
        return False
    first = parts[0]
    return all(
        (p.in_features, p.bits, p.gpr, p.values.dtype, p.bias is None, p.codes.device)
        == (first.in_features, first.bits, first.gpr, first.values.dtype, first.bias is None,
            first.codes.device)
        for p in parts
    )
