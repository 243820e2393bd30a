import pytest
import torch

from sketchtune.format import dequantize
from sketchtune.learn import Prepared, assign_codes, learn_sketch, prepare


def test_few_distinct_values_are_represented_exactly():
    g = torch.Generator().manual_seed(1)
    levels = torch.randn(6, 2, 16, generator=g)
    codes = torch.randint(0, 16, (6, 64), generator=g)
    w = dequantize(codes, levels)
    for hessian in (None, torch.eye(64)):
        c, v, _ = learn_sketch(w, hessian, bits=4, gpr=2)
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
    plain = dequantize(*learn_sketch(w, None, bits=2, gpr=1)[:2])
    aware = dequantize(*learn_sketch(w, h, bits=2, gpr=1)[:2])
    assert _output_error(w, aware, x) < 0.7 * _output_error(w, plain, x)


def test_dead_columns_are_zeroed():
    w = torch.randn(4, 16, generator=torch.Generator().manual_seed(0)) + 3  # none near 0
    h = torch.eye(16)
    h[3, 3] = 0
    prepared = prepare(w, h)
    assert torch.all(prepared.weight[:, 3] == 0)
    torch.testing.assert_close(prepared.weight[:, [0, 1, 2, *range(4, 16)]],
                               w[:, [0, 1, 2, *range(4, 16)]])
    codes, values, _ = learn_sketch(w, h, bits=4, gpr=1)
    assert codes.dtype == torch.uint8 and values.shape == (4, 1, 16)
    assert codes.shape == (4, 16)
    # the dead column is coded as 0 was: each row's table entry nearest 0
    nearest_zero = values[:, 0].abs().argmin(dim=1)
    assert torch.equal(codes[:, 3].long(), nearest_zero)


def _correlated_problem(d_out=24, d_in=80, n=400, seed=3):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d_in, d_in, generator=g) * torch.logspace(0, -1.5, d_in)[None]
    x = torch.randn(n, d_in, generator=g, dtype=torch.float64) @ mix.double().T
    w = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    return w, 2 / n * x.T @ x


def _uniform_grid(w, group, bits=4):
    """Min-max uniform tables per (row, group of `group` columns): scale and zero per group."""
    d_out, d_in = w.shape
    grouped = w.reshape(d_out, d_in // group, group)
    low = grouped.min(-1).values
    scale = (grouped.max(-1).values - low) / ((1 << bits) - 1)
    levels = torch.arange(1 << bits, dtype=w.dtype)
    return low[..., None] + scale[..., None] * levels, low, scale


def _plain_gptq(w, h, low, scale, group, damp, bits=4):
    """Textbook GPTQ, one column at a time, no lazy batches: damp, act order, upper Cholesky
    factor of H⁻¹, round to the column's grid, push the scaled error onto every later column."""
    w = w.clone()
    perm = torch.argsort(h.diagonal(), descending=True)
    hp = h[perm][:, perm]
    hp = hp + damp * hp.diagonal().mean() * torch.eye(len(perm), dtype=h.dtype)
    u = torch.linalg.cholesky(torch.linalg.inv(hp), upper=True)
    wp = w[:, perm]
    codes = torch.empty(wp.shape, dtype=torch.int64)
    loss = torch.zeros(w.shape[0], dtype=w.dtype)
    for i in range(wp.shape[1]):
        g = perm[i] // group
        q = torch.clamp(torch.round((wp[:, i] - low[:, g]) / scale[:, g]), 0, (1 << bits) - 1)
        codes[:, i] = q.long()
        err = (wp[:, i] - (low[:, g] + scale[:, g] * q)) / u[i, i]
        loss += err**2 / 2
        wp[:, i + 1 :] -= err[:, None] * u[i, i + 1 :][None, :]
    out = torch.empty_like(codes)
    out[:, perm] = codes
    return out, loss


def _prepared64(w, h, damp):
    """`prepare` in float64 (it works in fp32): the comparisons below test the algorithm, not
    rounding near ties."""
    perm = torch.argsort(h.diagonal(), descending=True)
    hp = h[perm][:, perm]
    hp = hp + damp * hp.diagonal().mean() * torch.eye(len(perm), dtype=h.dtype)
    upper = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(hp)), upper=True)
    fp32 = prepare(w, h, damp)
    assert torch.equal(fp32.perm, perm)
    torch.testing.assert_close(fp32.upper.double(), upper, rtol=1e-3, atol=1e-3)
    return Prepared(w.clone(), perm, upper)


def test_assign_codes_on_a_uniform_grid_is_plain_gptq():
    w, h = _correlated_problem()
    group = 16
    tables, low, scale = _uniform_grid(w, group)
    group_of = torch.arange(w.shape[1]) // group
    codes, loss = assign_codes(_prepared64(w, h, 0.01), tables, group_of, column_batch=32)
    expected_codes, expected_loss = _plain_gptq(w, h, low, scale, group, 0.01)
    assert torch.equal(codes, expected_codes)
    torch.testing.assert_close(loss, expected_loss)


@pytest.mark.parametrize("column_batch", [1, 7, 32, 128])
def test_blocked_and_unblocked_runs_give_identical_codes(column_batch):
    w, h = _correlated_problem(seed=4)
    tables, _, _ = _uniform_grid(w, 20, bits=3)
    group_of = torch.arange(w.shape[1]) // 20
    prepared = _prepared64(w, h, 0.01)
    unblocked, unblocked_loss = assign_codes(prepared, tables, group_of, column_batch=w.shape[1])
    codes, loss = assign_codes(prepared, tables, group_of, column_batch=column_batch)
    assert torch.equal(codes, unblocked)
    torch.testing.assert_close(loss, unblocked_loss)


def test_row_loss_is_the_damped_hessian_weighted_error_of_the_codes():
    # GPTQ's per-column losses add up to the final quadratic error ½ (w - ŵ) H_damped (w - ŵ)ᵀ
    # of each row: an identity the error compensation must keep, whatever the batching.
    w, h = _correlated_problem(seed=5)
    tables, _, _ = _uniform_grid(w, 40)
    codes, loss = assign_codes(_prepared64(w, h, 0.01), tables, torch.arange(80) // 40)
    q = tables.gather(2, codes.reshape(24, 2, 40)).reshape(24, 80)
    damped = h + 0.01 * h.diagonal().mean() * torch.eye(80, dtype=h.dtype)
    torch.testing.assert_close(loss, (((w - q) @ damped) * (w - q)).sum(1) / 2)
