import pytest
import torch
import torch.nn.functional as F

from sketchtune.format import SketchedWeight, dequantize
from sketchtune.layers import SketchLinear


def make_layer(d_in, d_out, bits, gpr, bias=False, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (d_out, d_in), generator=g, dtype=torch.uint8)
    values = torch.randn(d_out, gpr, 1 << bits, generator=g)
    b = torch.randn(d_out, generator=g) if bias else None
    layer = SketchLinear.from_sketch(SketchedWeight.from_codes(codes, values, bits), b)
    return layer.to(dtype), codes


@pytest.mark.parametrize("bits,gpr", [(4, 1), (4, 4), (3, 2), (2, 8)])
def test_forward_equals_dense_linear(bits, gpr):
    layer, codes = make_layer(64, 24, bits, gpr, bias=True)
    x = torch.randn(3, 5, 64)
    dense = torch.nn.Linear(64, 24)
    with torch.no_grad():
        dense.weight.copy_(dequantize(codes, layer.values))
        dense.bias.copy_(layer.bias)
    torch.testing.assert_close(layer(x), dense(x))


@pytest.mark.parametrize("bits,gpr", [(4, 2), (3, 1), (2, 4)])
def test_gradcheck_float64(bits, gpr):
    layer, codes = make_layer(16, 6, bits, gpr, seed=3)
    values = layer.values.detach().double().requires_grad_(True)
    x = torch.randn(2, 4, 16, dtype=torch.float64, requires_grad=True)
    from sketchtune.kernels import lut_linear

    assert torch.autograd.gradcheck(lambda a, v: lut_linear(a, codes, v), (x, values))


def test_gradients_match_autograd_through_explicit_gather():
    layer, codes = make_layer(32, 10, 4, 4, seed=5)
    x = torch.randn(7, 32, requires_grad=True)
    layer(x).pow(2).sum().backward()

    values = layer.values.detach().clone().requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    group = 32 // 4
    index = codes.long().reshape(10, 4, group)
    w = torch.gather(values, 2, index).reshape(10, 32)
    F.linear(x_ref, w).pow(2).sum().backward()

    # the kernels sum in another order than F.linear: fp32 rounding, not fp32's default tolerance
    torch.testing.assert_close(layer.values.grad, values.grad, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-4)
    assert layer.values.grad.dtype == torch.float32


def test_values_gradient_is_a_sum_over_each_bin():
    # Every weight of the row shares code 0: its gradient is the sum of dŴ over the whole group.
    d_in, d_out = 8, 2
    codes = torch.zeros(d_out, d_in, dtype=torch.uint8)
    layer = SketchLinear.from_sketch(SketchedWeight.from_codes(codes, torch.ones(d_out, 1, 16), 4))
    x = torch.randn(3, d_in)
    layer(x).sum().backward()
    expected = x.sum(0).sum().expand(d_out)
    torch.testing.assert_close(layer.values.grad[:, 0, 0], expected)
    assert torch.count_nonzero(layer.values.grad[:, 0, 1:]) == 0


def test_bf16_activations_keep_fp32_value_gradients():
    layer, codes = make_layer(32, 8, 4, 2, seed=9)
    x = torch.randn(4, 32).bfloat16()
    y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert layer.values.grad.dtype == torch.float32


def test_bias_is_frozen_and_only_values_train():
    layer, _ = make_layer(16, 4, 4, 1, bias=True)
    trainable = [n for n, p in layer.named_parameters() if p.requires_grad]
    assert trainable == ["values"]
    assert [n for n, _ in layer.named_buffers()] == ["codes"]
