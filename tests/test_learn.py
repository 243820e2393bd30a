import torch

from sketchtune.format import dequantize
from sketchtune.learn import learn_sketch


def test_few_distinct_values_are_represented_exactly():
    g = torch.Generator().manual_seed(1)
    levels = torch.randn(6, 2, 16, generator=g)
    codes = torch.randint(0, 16, (6, 64), generator=g)
    w = dequantize(codes, levels)
    for hessian in (None, torch.eye(64)):
        c, v = learn_sketch(w, hessian, bits=4, gpr=2)
        torch.testing.assert_close(dequantize(c, v), w, atol=1e-5, rtol=0)


def _output_error(w, w_hat, x):
    return ((x @ (w - w_hat).T) ** 2).mean().item()


def test_data_aware_sketch_beats_plain_kmeans_on_outputs():
    # Correlated inputs with a few dominant directions: the Hessian steps should exploit them.
    g = torch.Generator().manual_seed(2)
    d_in, d_out, n = 64, 32, 2048
    mix = torch.randn(d_in, d_in, generator=g) * torch.logspace(0, -2, d_in)[None]
    x = torch.randn(n, d_in, generator=g) @ mix.T
    w = torch.randn(d_out, d_in, generator=g)
    h = 2 / n * x.T @ x
    plain = dequantize(*learn_sketch(w, None, bits=2, gpr=1))
    aware = dequantize(*learn_sketch(w, h, bits=2, gpr=1))
    assert _output_error(w, aware, x) < 0.7 * _output_error(w, plain, x)


def test_dead_columns_are_zeroed():
    w = torch.randn(4, 16)
    h = torch.eye(16)
    h[3, 3] = 0
    codes, values = learn_sketch(w, h, bits=4, gpr=1)
    assert codes.dtype == torch.uint8 and values.shape == (4, 1, 16)
    assert codes.shape == (4, 16)
