import pytest
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


@pytest.mark.parametrize("shape", [(1, 64), (3, 128), (16, 192), (7, 576), (64, 1536)])
def test_nf4_byte_table_dequant_is_bit_identical_to_unpacked_lookup(shape):
    from sketchtune.baselines import dequantize_nf4_reference

    w = torch.randn(shape) * torch.rand(shape[0], 1) * 3
    packed, scales = quantize_nf4(w)
    reference = dequantize_nf4_reference(packed, scales, shape[1])
    assert reference.shape == shape
    assert torch.equal(dequantize_nf4(packed, scales, shape[1]), reference)


def test_nf4_dequant_rejects_a_width_its_codes_do_not_hold():
    packed, scales = quantize_nf4(torch.randn(2, 128))
    with pytest.raises(ValueError, match="do not hold 192"):
        dequantize_nf4(packed, scales, 192)


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


def structured_weight(d_out=48, d_in=128, seed=0) -> torch.Tensor:
    """Low rank plus noise with a few outliers: what LoftQ's low-rank part can absorb."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d_out, 4, generator=g) @ torch.randn(4, d_in, generator=g) * 0.3
    w += 0.05 * torch.randn(d_out, d_in, generator=g)
    w[torch.rand(d_out, d_in, generator=g) < 0.01] *= 8
    return w


def test_loftq_start_is_closer_to_w_than_the_nf4_base_by_the_recorded_amount():
    from sketchtune.baselines import init_errors, nf4_round_trip

    linear = nn.Linear(128, 48)
    linear.weight.data = structured_weight()
    w = linear.weight.detach().clone()
    layer = NF4LoraLinear(linear, rank=4, loftq_iterations=5)
    plain = ((w - nf4_round_trip(w)).norm() / w.norm()).item()
    q = dequantize_nf4(layer.codes, layer.scales, 128)
    start = layer.effective_weight()
    errors = init_errors({"l": w}, nn.ModuleDict({"l": layer}))
    assert errors["with_lora"] == pytest.approx(((w - start).norm() / w.norm()).item(), rel=1e-5)
    assert errors["nf4"] == pytest.approx(((w - q).norm() / w.norm()).item(), rel=1e-5)
    assert errors["with_lora"] < 0.8 * plain  # measured on this weight: 0.67x (T=1: 0.77x)
    # s·B A is the best rank-4 fit of W - Q (Eckart-Young), the LoftQ definition
    tail = torch.linalg.svdvals(w - q)[4:]
    assert (w - start).norm() == pytest.approx(tail.norm().item(), rel=1e-4)
    x = torch.randn(3, 128)
    torch.testing.assert_close(layer(x), x @ start.T + linear.bias, rtol=1e-4, atol=1e-5)
    # plain QLoRA-style starts at NF4(W) exactly: no gain
    qlora = init_errors({"l": w}, nn.ModuleDict({"l": NF4LoraLinear(linear, rank=4)}))
    assert qlora["nf4"] == pytest.approx(plain, rel=1e-5) == qlora["with_lora"]
    # more alternations never undo the first one's gain here
    one = init_errors({"l": w}, nn.ModuleDict({"l": NF4LoraLinear(linear, 4, 1)}))
    assert errors["with_lora"] <= one["with_lora"] * 1.001 < plain


def test_loftq_matches_peft_loftq_loop_with_our_quantizer():
    """PEFT's loftq_init needs bitsandbytes on a GPU; its loop, with PEFT's own low-rank
    decomposition and our NF4 round trip in place of bitsandbytes, gives our factors."""
    loftq_utils = pytest.importorskip("peft.utils.loftq_utils")
    from sketchtune.baselines import loftq_init, nf4_round_trip

    w = structured_weight(seed=1)
    res = w.clone()
    for i in range(3):  # peft.utils.loftq_utils.loftq_init, num_iter=3
        dequantized = nf4_round_trip(res)
        out = loftq_utils._low_rank_decomposition(w - dequantized, reduced_rank=4)
        if i + 1 < 3:
            res = w - out["L"] @ out["R"]
    target, a, b = loftq_init(w, 4, iterations=3, scaling=2.0)
    torch.testing.assert_close(nf4_round_trip(target), dequantized)
    torch.testing.assert_close(2.0 * b @ a, out["L"] @ out["R"], rtol=1e-4, atol=1e-5)
