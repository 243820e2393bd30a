import torch
from torch import nn

from sketchtune.baselines import (
    NF4LoraLinear,
    dequantize_nf4,
    lora_model,
    matched_lora_rank,
    qlora_style_model,
    quantize_nf4,
    sketch_parameter_count,
)
from tests.conftest import tiny_model


def test_nf4_round_trip_is_close():
    w = torch.randn(16, 128)
    approx = dequantize_nf4(*quantize_nf4(w), 128)
    assert ((approx - w).norm() / w.norm()) < 0.12
    # The largest weight of every block is represented exactly (absmax scaling).
    blocks = w.reshape(16, 2, 64)
    idx = blocks.abs().argmax(-1, keepdim=True)
    torch.testing.assert_close(
        approx.reshape(16, 2, 64).gather(-1, idx), blocks.gather(-1, idx), rtol=1e-6, atol=1e-6
    )


def test_nf4_lora_starts_at_the_quantized_base_and_trains_only_lora():
    linear = nn.Linear(64, 8)
    layer = NF4LoraLinear(linear, rank=4)
    x = torch.randn(3, 64)
    base = dequantize_nf4(layer.codes, layer.scales, 64)
    torch.testing.assert_close(layer(x), x @ base.T + linear.bias)
    assert sorted(n for n, p in layer.named_parameters()) == ["lora_a", "lora_b"]


def test_matched_rank_and_wrapped_models():
    model = tiny_model()
    # tiny Llama block: d_out sum 64+32+32+64+128+128+64 = 512 per block, 2 blocks, gpr 4, 16
    assert sketch_parameter_count(model, gpr=4) == 512 * 2 * 4 * 16
    rank = matched_lora_rank(model, gpr=4)
    peft = lora_model(tiny_model(), rank)
    trainable = sum(p.numel() for p in peft.parameters() if p.requires_grad)
    assert abs(trainable - sketch_parameter_count(model, 4)) / trainable < 0.15
    q = qlora_style_model(tiny_model(), rank)
    assert sum(p.numel() for p in q.parameters() if p.requires_grad) == trainable
    assert q(torch.randint(0, 97, (1, 8))).logits.shape == (1, 8, 128)
