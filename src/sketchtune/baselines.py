"""Baselines for side-by-side runs: LoRA / DoRA through PEFT, and a QLoRA-style 4-bit base.

bitsandbytes has no 4-bit path on this CPU-only machine, so the QLoRA-style baseline is our own
plain-PyTorch one, stated as such: 4-bit normal-float codes (16 levels at evenly spaced quantiles
of a standard normal) with one absmax scale per 64 weights, dequantized on the fly in every
forward, plus trainable LoRA factors (B zero-initialised, as in LoRA).

LoftQ is the same layer with another start: PEFT's LoftQ needs bitsandbytes on a GPU, so
`loftq_init` is our own, on this NF4 base: alternate Q = NF4(W - s·B A) and the rank-r SVD of
W - Q, T times, so that Q + s·B A starts closer to W than Q alone (s: the LoRA scaling).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .compression import find_decoder_blocks
from .format import pack_codes, unpack_codes

NF_BLOCK = 64
# (16,) levels in [-1, 1]: normal quantiles at (i + 0.5) / 16, scaled to unit absmax.
NF_LEVELS = torch.special.ndtri((torch.arange(16, dtype=torch.float64) + 0.5) / 16)
NF_LEVELS = (NF_LEVELS / NF_LEVELS.abs().max()).float()
# (256, 2): the two levels one packed byte holds, low nibble first as format.pack_codes packs.
_BYTES = torch.arange(256)
NF_BYTE_LEVELS = torch.stack([NF_LEVELS[_BYTES & 15], NF_LEVELS[_BYTES >> 4]], -1)


def projection_names(model: nn.Module) -> list[str]:
    """Distinct leaf names of the nn.Linear modules inside the decoder blocks (q_proj, ...)."""
    _, blocks = find_decoder_blocks(model)
    names = {n.rsplit(".", 1)[-1] for n, m in blocks[0].named_modules() if isinstance(m, nn.Linear)}
    return sorted(names)


def block_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Every nn.Linear inside the decoder blocks, by full module name."""
    prefix, blocks = find_decoder_blocks(model)
    return {
        f"{prefix}.{i}.{n}": m
        for i, block in enumerate(blocks)
        for n, m in block.named_modules()
        if isinstance(m, nn.Linear)
    }


def sketch_parameter_count(model: nn.Module, gpr: int, bits: int = 4) -> int:
    """Trainable parameters a sketch of `model` would have: Σ d_out · gpr · 2**bits."""
    return sum(m.out_features * gpr * (1 << bits) for m in block_linears(model).values())


def matched_lora_rank(model: nn.Module, gpr: int, bits: int = 4) -> int:
    """LoRA rank whose r · Σ (d_in + d_out) comes closest to the sketch's parameter count."""
    per_rank = sum(m.in_features + m.out_features for m in block_linears(model).values())
    return max(1, round(sketch_parameter_count(model, gpr, bits) / per_rank))


def lora_model(model: nn.Module, rank: int, dora: bool = False) -> nn.Module:
    """PEFT LoRA (or DoRA) of rank `rank`, alpha 2·rank, no dropout, on every projection."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=rank, lora_alpha=2 * rank, lora_dropout=0.0, use_dora=dora,
        target_modules=projection_names(model), task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def quantize_nf4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(d_out, d_in) -> packed 4-bit codes (d_out, d_in/2) uint8, absmax scales (d_out, d_in/64)."""
    d_out, d_in = weight.shape
    blocks = weight.float().reshape(d_out, d_in // NF_BLOCK, NF_BLOCK)
    scales = blocks.abs().amax(-1).clamp_min(1e-12)  # (d_out, n_blocks)
    normed = blocks / scales[..., None]
    codes = (normed[..., None] - NF_LEVELS).abs().argmin(-1).reshape(d_out, d_in)
    return pack_codes(codes, 4), scales


def dequantize_nf4_reference(packed: torch.Tensor, scales: torch.Tensor, d_in: int) -> torch.Tensor:
    """The plain path `dequantize_nf4` must match bit for bit: unpack every code, index the 16
    levels with it, scale each block."""
    levels = NF_LEVELS.to(scales.device)[unpack_codes(packed, 4, d_in).long()]
    return (levels.reshape(packed.shape[0], -1, NF_BLOCK) * scales[..., None]).reshape(-1, d_in)


def dequantize_nf4(packed: torch.Tensor, scales: torch.Tensor, d_in: int) -> torch.Tensor:
    """Packed codes and scales -> (d_out, d_in) weight, one lookup per byte: bit-identical to
    `dequantize_nf4_reference`, about 4x faster on CPU, which every forward pays."""
    d_out = packed.shape[0]
    if packed.shape[1] * 2 != d_in:
        raise ValueError(f"packed codes of shape {tuple(packed.shape)} do not hold {d_in} per row")
    table = NF_BYTE_LEVELS.to(scales.device)
    levels = table.index_select(0, packed.reshape(-1).int()).reshape(d_out, -1, NF_BLOCK)
    return levels.mul_(scales[..., None]).reshape(d_out, d_in)


LORA_SCALING = 2.0  # alpha = 2 · rank
LOFTQ_ITERATIONS = 5  # the LoftQ paper's T for 4-bit bases


def nf4_round_trip(weight: torch.Tensor) -> torch.Tensor:
    """What the NF4 base holds for `weight`, dequantized."""
    return dequantize_nf4(*quantize_nf4(weight), weight.shape[1])


def loftq_init(
    weight: torch.Tensor,
    rank: int,
    iterations: int = LOFTQ_ITERATIONS,
    round_trip: Callable[[torch.Tensor], torch.Tensor] = nf4_round_trip,
    scaling: float = LORA_SCALING,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LoftQ: (the matrix to quantize, A (rank, d_in), B (d_out, rank)) after `iterations`
    rounds of Q = round_trip(W - s·B A), then B A = the rank-`rank` SVD of (W - Q) / s."""
    if iterations < 1:
        raise ValueError(f"LoftQ needs at least one iteration, got {iterations}")
    weight = weight.detach().float()
    update = torch.zeros_like(weight)  # s·B A, none before the first round
    for _ in range(iterations):
        target = weight - update
        u, s, vh = torch.linalg.svd(weight - round_trip(target), full_matrices=False)
        root = (s[:rank] / scaling).sqrt()  # split the singular values evenly over A and B
        a, b = root[:, None] * vh[:rank], u[:, :rank] * root
        update = scaling * b @ a
    return target, a, b


class NF4LoraLinear(nn.Module):
    """Frozen 4-bit base weight, dequantized per call, plus a trainable LoRA update.

    `loftq_iterations` > 0 starts from LoftQ (`loftq_init`) instead of B = 0 on NF4(W)."""

    def __init__(self, linear: nn.Linear, rank: int, loftq_iterations: int = 0) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.scaling = LORA_SCALING
        base = linear.weight.detach()
        if loftq_iterations:
            base, a, b = loftq_init(base, rank, loftq_iterations, scaling=self.scaling)
        packed, scales = quantize_nf4(base)
        self.register_buffer("codes", packed)
        self.register_buffer("scales", scales)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach())
        self.lora_a = nn.Parameter(torch.empty(rank, self.in_features))
        self.lora_b = nn.Parameter(torch.zeros(self.out_features, rank))
        if loftq_iterations:
            self.lora_a.data.copy_(a)
            self.lora_b.data.copy_(b)
        else:
            nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))

    def effective_weight(self) -> torch.Tensor:
        """Q + s·B A: the weight this layer applies."""
        q = dequantize_nf4(self.codes, self.scales, self.in_features)
        return q + self.scaling * self.lora_b.detach() @ self.lora_a.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = dequantize_nf4(self.codes, self.scales, self.in_features).to(x.dtype)
        y = F.linear(x, weight, self.bias)
        return y + F.linear(F.linear(x, self.lora_a), self.lora_b) * self.scaling


def qlora_style_model(model: nn.Module, rank: int, loftq_iterations: int = 0) -> nn.Module:
    """Swap every block projection for NF4LoraLinear (LoftQ-initialised if `loftq_iterations`);
    everything else frozen. In place."""
    for param in model.parameters():
        param.requires_grad_(False)
    for name, linear in block_linears(model).items():
        model.set_submodule(name, NF4LoraLinear(linear, rank, loftq_iterations))
    return model


def init_errors(dense: dict[str, torch.Tensor], model: nn.Module) -> dict[str, float]:
    """How far the quantized model starts from the dense weights `dense` (by module name), over
    all block projections: ||W - Q||_F / ||W||_F for the NF4 base alone ("nf4") and with the
    initial LoRA update, Q + s·B A ("with_lora": equal to "nf4" unless LoftQ started it)."""
    squares = {"weight": 0.0, "nf4": 0.0, "with_lora": 0.0}
    for name, layer in model.named_modules():
        if not isinstance(layer, NF4LoraLinear):
            continue
        w = dense[name].float()
        q = dequantize_nf4(layer.codes, layer.scales, layer.in_features)
        squares["weight"] += float(w.square().sum())
        squares["nf4"] += float((w - q).square().sum())
        squares["with_lora"] += float((w - layer.effective_weight()).square().sum())
    return {k: math.sqrt(squares[k] / squares["weight"]) for k in ("nf4", "with_lora")}
