import pytest
import torch

from sketchtune import learn
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("rows,width,groups", [(1, 1, 1), (5, 7, 2), (70, 128, 4), (3, 33, 8)])
def test_compiled_column_pass_gives_the_bits_of_the_torch_pass(dtype, rows, width, groups):
    # The CPU path (numba, row by row) against the device-generic tensor loop, ties included:
    # repeated table entries must resolve to the first, as argmin does.
    g = torch.Generator().manual_seed(rows * width)
    batch = torch.randn(rows, width, generator=g, dtype=dtype)
    tables = torch.randn(rows, groups, 16, generator=g, dtype=dtype).round(decimals=1)
    tables[:, :, 8:] = tables[:, :, :8]
    chosen = torch.randint(0, groups, (width,), generator=g)
    a = torch.randn(width, width, generator=g, dtype=dtype)
    u = torch.linalg.cholesky(a @ a.T + width * torch.eye(width, dtype=dtype)).T.contiguous()
    codes, errors = learn._code_batch_cpu(batch.clone(), tables, chosen, u)
    expected_codes, expected_errors = learn._code_batch_torch(batch.clone(), tables, chosen, u)
    assert codes.max() < 8
    assert torch.equal(codes, expected_codes)
    assert torch.equal(errors, expected_errors)


def test_row_loss_is_the_damped_hessian_weighted_error_of_the_codes():
    # GPTQ's per-column losses add up to the final quadratic error ½ (w - ŵ) H_damped (w - ŵ)ᵀ
    # of each row: an identity the error compensation must keep, whatever the batching.
    w, h = _correlated_problem(seed=5)
    tables, _, _ = _uniform_grid(w, 40)
    codes, loss = assign_codes(_prepared64(w, h, 0.01), tables, torch.arange(80) // 40)
    q = tables.gather(2, codes.reshape(24, 2, 40)).reshape(24, 80)
    damped = h + 0.01 * h.diagonal().mean() * torch.eye(80, dtype=h.dtype)
    torch.testing.assert_close(loss, (((w - q) @ damped) * (w - q)).sum(1) / 2)


def _bits(t):
    """A float tensor's raw bits, so that equality means bit for bit (-0.0 is not 0.0)."""
    return t.view(torch.int32) if t.dtype == torch.float32 else t


@pytest.mark.parametrize("dead", [(), (0, 5, 17)])
@pytest.mark.parametrize("kmeans", ["exact", "lloyd"])
def test_chunked_learn_sketch_is_bit_identical_to_one_chunk(monkeypatch, dead, kmeans):
    w, h = _correlated_problem(d_out=200, d_in=48, seed=6)
    w, h = w.float(), h.float()
    h[:, list(dead)] = 0.0
    h[list(dead), :] = 0.0
    whole = learn.learn_sketch(w, h, bits=3, gpr=4, column_batch=16, kmeans=kmeans)
    calls = []

    def counted(name):
        inner = getattr(learn, name)

        def wrapper(*args, **kwargs):
            calls.append(name)
            return inner(*args, **kwargs)
        return wrapper

    for name in ("fit_tables", "assign_codes"):  # wrapped by attribute, as scale.py times them
        monkeypatch.setattr(learn, name, counted(name))
    monkeypatch.setattr(learn, "CHUNK_WEIGHTS", 1)  # 64-row chunks: rows 0-63, 64-127, 128-199
    chunked = learn.learn_sketch(w, h, bits=3, gpr=4, column_batch=16, kmeans=kmeans)
    assert calls == ["fit_tables", "assign_codes"] * 3
    assert chunked.codes.dtype == torch.uint8 and chunked.codes.shape == (200, 48)
    for got, expected in zip(chunked, whole, strict=True):
        assert torch.equal(_bits(got), _bits(expected))


def test_fit_tables_equals_one_kmeans_over_every_row_and_group():
    w, h = _correlated_problem(seed=7)
    w = w.float()
    importance = torch.rand(80, generator=torch.Generator().manual_seed(0)) + 0.1
    for kmeans in ("exact", "lloyd"):
        expanded = importance.reshape(1, 4, 20).expand(24, 4, 20).reshape(-1, 20)
        expected = learn.KMEANS[kmeans](w.reshape(-1, 20), expanded, 16).reshape(24, 4, 16)
        got = learn.fit_tables(w, importance, bits=4, gpr=4, kmeans=kmeans)
        assert torch.equal(_bits(got), _bits(expected))


def _textbook_factor_check(h, damp, growth=1):
    """Uᵀ U = (H + λ mean(diag H) I)⁻¹ in float64, U upper triangular with a positive diagonal."""
    upper = learn.inverse_hessian_factor(h, damp)
    assert torch.equal(upper, upper.triu()) and (upper.diagonal() > 0).all()
    h64 = h.double()
    damped = h64 + damp * growth * h64.diagonal().mean() * torch.eye(len(h), dtype=h64.dtype)
    torch.testing.assert_close(upper.double().T @ upper.double(), torch.linalg.inv(damped),
                               rtol=1e-3, atol=1e-4)


def test_inverse_hessian_factor_is_the_textbook_factor():
    _, h = _correlated_problem(seed=8)
    for hessian in (h.float(), _correlated_problem(n=30, seed=9)[1].float()):  # full, rank 30
        before = hessian.clone()
        _textbook_factor_check(hessian, 0.01)
        assert torch.equal(_bits(hessian), _bits(before))


def test_inverse_hessian_factor_retries_from_the_callers_hessian():
    # Eigenvalues down to -0.02 with mean 0.5: λ = 0.01 · 0.5 leaves H indefinite, 10 λ does not.
    g = torch.Generator().manual_seed(10)
    q, _ = torch.linalg.qr(torch.randn(40, 40, generator=g, dtype=torch.float64))
    eigenvalues = torch.linspace(-0.02, 1.02, 40, dtype=torch.float64)
    h = (q * eigenvalues) @ q.T
    assert not torch.linalg.cholesky_ex(h + 0.005 * torch.eye(40, dtype=h.dtype)).info == 0
    _textbook_factor_check(h.float(), 0.01, growth=10)


def test_learn_sketch_leaves_the_callers_hessian_as_it_was():
    w, h = _correlated_problem(seed=11)
    for hessian in (h.float(), h):
        hessian[:, 7] = hessian[7, :] = 0.0  # a dead column: its H_cc = 1 is learn's own
        before = hessian.clone()
        learn.learn_sketch(w, hessian, bits=3, gpr=2)
        assert torch.equal(_bits(hessian), _bits(before))
