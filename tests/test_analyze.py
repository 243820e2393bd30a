"""Sketch-vs-low-rank analysis: error formulas against brute force, synthetic classes, CLI."""

from __future__ import annotations

import argparse
import itertools
import json
import math

import pytest
import torch

from sketchtune.analyze import metrics
from sketchtune.analyze.cli import add_analyze_parser
from sketchtune.analyze.sources import collect_hessians
from sketchtune.analyze.synthetic import synthetic_table
from sketchtune.errors import SketchtuneError


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("shape", [(12, 8), (8, 12), (10, 10)])
@pytest.mark.parametrize("rank", [0, 1, 3, 8])
def test_rank_error_is_tail_of_singular_values(shape, rank):
    delta = torch.randn(*shape, generator=_gen())
    sv = torch.linalg.svdvals(delta.double())
    expected = math.sqrt(float(sv[rank:].square().sum())) / float(delta.double().norm())
    assert metrics.rank_errors(delta, rank, None)["rank"] == pytest.approx(expected, abs=1e-9)


def test_truncated_svd_matches_full_svd():
    delta = torch.randn(9, 6, generator=_gen(1)).double()
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    direct = (u[:, :2] * s[:2]) @ vh[:2]
    torch.testing.assert_close(metrics.truncated_svd(delta, 2), direct)


def test_rank_for_budget():
    assert metrics.rank_for_budget(576, 576, metrics.sketch_params(576, 4, 4)) == 32
    assert metrics.rank_for_budget(4, 4, 10**6) == 4  # never above the full rank


def _one_hot_design(codes: torch.Tensor, gpr: int, n_codes: int) -> torch.Tensor:
    """(d_in, gpr * n_codes) 0/1 matrix: column c of the row picks its (group, code) bin."""
    d_in = codes.numel()
    design = torch.zeros(d_in, gpr * n_codes, dtype=torch.float64)
    for c in range(d_in):
        design[c, (c // (d_in // gpr)) * n_codes + int(codes[c])] = 1.0
    return design


def test_frozen_codes_optimum_is_least_squares_over_bins():
    bits, gpr, d_in = 2, 2, 16
    delta = torch.randn(3, d_in, generator=_gen(2))
    codes = torch.randint(0, 4, (3, d_in), generator=_gen(3))
    codes[0, :8] = 0  # group 0 of row 0 uses one bin only: the empty bins must not matter
    approx = metrics.frozen_codes_approx(delta, codes, gpr, bits)
    for row in range(3):
        design = _one_hot_design(codes[row], gpr, 1 << bits)
        target = delta[row].double()[:, None]
        values = torch.linalg.lstsq(design, target, driver="gelsd").solution
        torch.testing.assert_close(approx[row], (design @ values)[:, 0])


def _brute_kmeans_cost(points: list[float], k: int) -> float:
    """Smallest within-cluster squared error over every assignment of points to k clusters."""
    best = math.inf
    for labels in itertools.product(range(k), repeat=len(points)):
        cost = 0.0
        for c in range(k):
            members = [p for p, lab in zip(points, labels, strict=True) if lab == c]
            if members:
                mean = sum(members) / len(members)
                cost += sum((p - mean) ** 2 for p in members)
        best = min(best, cost)
    return best


def test_free_codes_error_is_exact_kmeans_objective():
    bits, gpr = 1, 2  # 2 clusters per group of 7 points: 2**7 assignments per group
    delta = torch.randn(2, 14, generator=_gen(4)).double()
    approx = metrics.free_codes_approx(delta, gpr, bits)
    brute = sum(
        _brute_kmeans_cost(group.tolist(), 1 << bits) for group in delta.reshape(-1, 7)
    )
    assert float((delta - approx).square().sum()) == pytest.approx(brute, rel=1e-9)
    expected = math.sqrt(brute) / float(delta.norm())
    frozen_codes = torch.zeros(2, 14, dtype=torch.long)
    errors = metrics.sketch_errors(delta, frozen_codes, None, bits, gpr)
    assert errors["free"] == pytest.approx(expected, rel=1e-9)


def test_hessian_weighted_error_matches_outputs():
    gen = _gen(5)
    x = torch.randn(40, 10, generator=gen).double()  # 40 tokens of a 10-wide input
    delta = torch.randn(6, 10, generator=gen).double()
    approx = metrics.truncated_svd(delta, 2)
    hessian = x.T @ x
    direct = float(((delta - approx) @ x.T).norm() / (delta @ x.T).norm())
    assert metrics.relative_error(delta, approx, hessian) == pytest.approx(direct, rel=1e-9)
    errors = metrics.rank_errors(delta, 2, hessian)
    assert errors["rank_h"] == pytest.approx(direct, rel=1e-9)


@pytest.mark.parametrize("shape", [(6, 10), (10, 6)])
def test_whitened_rank_is_optimal_under_hessian(shape):
    gen = _gen(6)
    x = torch.randn(50, shape[1], generator=gen).double() * torch.linspace(0.1, 3, shape[1])
    delta = torch.randn(*shape, generator=gen).double()
    hessian = x.T @ x
    # Brute force: truncate ΔW L (H = L Lᵀ) and map back; error measured on the outputs.
    lower = torch.linalg.cholesky(hessian)
    whitened = metrics.truncated_svd(delta @ lower, 2)
    approx = torch.linalg.solve_triangular(lower, whitened, upper=False, left=False)
    direct = float(((delta - approx) @ x.T).norm() / (delta @ x.T).norm())
    errors = metrics.rank_errors(delta, 2, hessian)
    assert errors["rank_h_opt"] == pytest.approx(direct, rel=1e-7)
    assert errors["rank_h_opt"] <= errors["rank_h"] + 1e-12


def test_collect_hessians_shares_inputs_and_matches_direct():
    from conftest import tiny_model

    model = tiny_model()
    layers = [f"model.layers.0.{n}" for n in ("self_attn.q_proj", "self_attn.k_proj",
                                              "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    windows = torch.randint(2, 97, (3, 16), generator=_gen(7))
    hessians = collect_hessians(model, layers, windows, batch_size=2)
    assert hessians[layers[0]] is hessians[layers[1]]
    assert hessians[layers[2]] is hessians[layers[3]]
    seen = []
    handle = model.get_submodule(layers[4]).register_forward_pre_hook(
        lambda _m, args: seen.append(args[0].reshape(-1, args[0].shape[-1]))
    )
    with torch.no_grad():
        model(windows)
    handle.remove()
    x = torch.cat(seen)
    torch.testing.assert_close(hessians[layers[4]], 2 * x.T @ x / x.shape[0], rtol=1e-4, atol=1e-5)


def test_synthetic_classes_behave():
    table = {row["class"]: row for row in synthetic_table(d_out=64, d_in=128, seed=0)}
    assert table["low-rank (rank 4)"]["rank"] < 1e-6
    assert table["few values per row (4)"]["free"] < 1e-9
    assert table["sparse (5% nonzero)"]["free"] < 1e-9  # at most 16 distinct values per group
    assert table["base-aligned (new values, same codes)"]["frozen"] < 1e-9
    gaussian = table["random Gaussian"]
    assert gaussian["rank"] > 0.5 and gaussian["frozen"] > 0.5


def _run_cli(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="sketchtune")
    add_analyze_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["analyze", *argv])
    args.func(args)


COMMON = ["--steps", "2", "--lr", "1e-3", "--seq-len", "256", "--hessian-samples", "2",
          "--hessian-seq-len", "64", "--calib"]


@pytest.fixture
def calib_file(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text("\n\n".join(f"Paragraph {i}: " + "some plain text here. " * 20
                                for i in range(8)))
    return path


def test_cli_short_finetune_on_sketched_model(sketched_tiny_dir, tiny_task_file, calib_file,
                                              tmp_path, capsys):
    out = tmp_path / "out"
    _run_cli([str(sketched_tiny_dir), "--short-finetune", str(tiny_task_file),
              *COMMON, str(calib_file), "--sample-rows", "16", "-o", str(out)])
    printed = capsys.readouterr().out
    assert "of 14 layers" in printed and "data-aware" in printed
    result = json.loads((out / "analyze.json").read_text())
    assert len(result["layers"]) == 14  # 7 projections x 2 blocks
    finetune = result["finetune"]
    assert len(finetune["losses"]) == finetune["steps"]  # one logged loss per train step
    first = result["layers"][0]
    assert first["rows_sampled"] == 16 and first["sketch_params"] == first["d_out"] * 2 * 16
    for key in ("rank", "frozen", "free", "rank_h", "frozen_h", "free_h", "rank_h_opt"):
        assert 0 <= first[key] <= 1.0 + 1e-9
    assert (out / "analyze.csv").read_text().count("\n") == 15
    assert (out / "analyze.png").stat().st_size > 1000


def test_cli_dense_model_and_task_sketch_delta(tiny_model_dir, sketched_tiny_dir, calib_file,
                                               tmp_path, capsys):
    from sketchtune.api import load
    from sketchtune.task_sketch import extract_task_sketch, save_task_sketch

    model = load(sketched_tiny_dir)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".values"):
                param.add_(0.01 * torch.randn(param.shape, generator=_gen(8)))
    save_task_sketch(extract_task_sketch(model), tmp_path / "task")
    out = tmp_path / "out"
    _run_cli([str(sketched_tiny_dir), "--delta", str(tmp_path / "task"), "--hessian-samples",
              "2", "--hessian-seq-len", "64", "--calib", str(calib_file), "-o", str(out)])
    layers = json.loads((out / "analyze.json").read_text())["layers"]
    assert max(r["frozen"] for r in layers) < 1e-6  # a values-only update fits frozen codes

    _run_cli([str(tiny_model_dir), "--delta", str(tiny_model_dir), "--gpr", "2",
              "--params-per-layer", "1000", "--hessian-samples", "2", "--hessian-seq-len", "64",
              "--calib", str(calib_file), "-o", str(out)])  # zero update: no division by zero
    assert "plain per-(row, group) k-means" in capsys.readouterr().out
    layers = json.loads((out / "analyze.json").read_text())["layers"]
    assert all(r["rank_r"] == 1000 // (r["d_out"] + r["d_in"]) for r in layers)
    assert all(r[key] == 0 for r in layers for key in ("rank", "frozen", "free", "rank_h"))


def test_cli_refuses_bad_combinations(sketched_tiny_dir, tiny_model_dir, tmp_path):
    with pytest.raises(SketchtuneError, match="exactly one"):
        _run_cli([str(tiny_model_dir)])
    with pytest.raises(SketchtuneError, match="--base"):
        _run_cli([str(sketched_tiny_dir), "--delta", str(tiny_model_dir), "--hessian-samples",
                  "1", "--hessian-seq-len", "8", "-o", str(tmp_path)])
    with pytest.raises(SystemExit):
        _run_cli([str(tiny_model_dir), "--delta", "a", "--short-finetune", "b"])


def test_cli_synthetic_alone(tmp_path, capsys):
    _run_cli(["--synthetic", "-o", str(tmp_path)])
    assert "random Gaussian" in capsys.readouterr().out
    assert len(json.loads((tmp_path / "synthetic.json").read_text())) == 6
