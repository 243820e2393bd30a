"""SketchLinear: a linear layer whose weight is a frozen code matrix plus trainable value tables."""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from .format import SketchedWeight, check_shape
from .kernels import lut_linear


class SketchLinear(nn.Module):
    """Drop-in for nn.Linear. State: `codes` (packed uint8 buffer), `values` (fp32 parameter).

    Only `values` is meant to train; `bias`, when present, is kept frozen as in the source model.
    The forward reads the packed codes directly (`kernels.lut_linear`: the C++ op on CPU).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int = 4,
        gpr: int = 4,
        bias: bool = False,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        check_shape(in_features, bits, gpr)
        self.in_features, self.out_features, self.bits, self.gpr = (
            in_features, out_features, bits, gpr,
        )
        self.register_buffer(
            "codes",
            torch.zeros(out_features, in_features * bits // 8, dtype=torch.uint8, device=device),
        )
        self.values = nn.Parameter(
            torch.zeros(out_features, gpr, 1 << bits, dtype=torch.float32, device=device)
        )
        self.bias = (
            nn.Parameter(torch.zeros(out_features, device=device), requires_grad=False)
            if bias
            else None
        )

    @classmethod
    def from_sketch(cls, sketch: SketchedWeight, bias: torch.Tensor | None = None) -> SketchLinear:
        layer = cls(
            sketch.in_features, sketch.out_features, sketch.bits, sketch.gpr,
            bias=bias is not None, device=sketch.codes.device,
        )
        layer.codes.copy_(sketch.codes)
        with torch.no_grad():
            layer.values.copy_(sketch.values)
            if bias is not None:
                layer.bias.copy_(bias)
        return layer

    def sketch(self) -> SketchedWeight:
        return SketchedWeight(self.codes, self.values.detach(), self.bits, self.in_features)

    def dequantized_weight(self) -> torch.Tensor:
        return self.sketch().dequantize()

    def train(self, mode: bool = True) -> SketchLinear:
        """Training starts from fp32 master tables (bf16 updates round away); inference keeps
        them as loaded. `.data` keeps the Parameter an optimizer may already hold."""
        if mode and self.values.requires_grad and self.values.dtype != torch.float32:
            self.values.data = self.values.data.float()
        return super().train(mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = lut_linear(x, self.codes, self.values, self.bits)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bits={self.bits}, gpr={self.gpr}, bias={self.bias is not None}"
        )


def sketched_layers(model: nn.Module) -> dict[str, SketchLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, SketchLinear)}


def base_fingerprint(model: nn.Module) -> str:
    """sha256 over every sketched layer's name and packed codes: identifies a sketched base."""
    digest = hashlib.sha256()
    for name, module in sorted(sketched_layers(model).items()):
        digest.update(name.encode())
        digest.update(module.codes.contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()[:32]
