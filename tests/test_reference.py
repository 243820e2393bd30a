import json
import math

import torch
from torch import nn

from sketchtune import reference, sources
from sketchtune.data.text import calibration_texts, heldout_texts
from sketchtune.reference import Recipe, build_grid_free, distinct_per_row, grid_report
from tests.conftest import char_tokenizer, tiny_model


def _on_q4_1_grid(w: torch.Tensor) -> torch.Tensor:
    """What the embedded GGUF holds: each 32-block rounded to 16 levels between its min and max."""
    blocks = w.reshape(-1, 32)
    low = blocks.min(1, keepdim=True).values
    step = (blocks.max(1, keepdim=True).values - low) / 15
    return (low + step * ((blocks - low) / step).round()).reshape(w.shape)


def test_distinct_values_are_counted_per_row():
    rows = torch.tensor([[1.0, 1.0, 2.0, 3.0], [0.5, 0.5, 0.5, 0.5]])
    assert distinct_per_row(rows).tolist() == [3, 1]


def test_grid_report_tells_on_grid_from_off_grid_weights():
    g = torch.Generator().manual_seed(0)
    grid = {"w": _on_q4_1_grid(torch.randn(8, 64, generator=g))}
    same = grid_report(grid, grid)
    assert same["blocks_with_at_most_16_values"] == same["blocks"] == 16
    assert same["relative_weight_change"] == 0 and same["grid_residual_rms"] < 1e-5
    step = (grid["w"].max() - grid["w"].min()) / 15
    # moved by far more than a step: the residual to the old grid is uniform, sqrt(1/12)
    far = {"w": grid["w"] + 20 * step * torch.rand(8, 64, generator=g)}
    report = grid_report(grid, far)
    assert report["blocks_with_at_most_16_values"] == 0
    assert abs(report["grid_residual_rms"] - math.sqrt(1 / 12)) < 0.05
    expected = (far["w"] - grid["w"]).norm() / grid["w"].norm()
    assert math.isclose(report["relative_weight_change"], float(expected), rel_tol=1e-5)


def test_reference_text_is_neither_calibration_nor_heldout_text():
    texts = reference.reference_texts()
    assert len(texts) > 500
    assert not set(texts) & (set(calibration_texts()) | set(heldout_texts()))


def test_a_short_finetune_moves_every_block_off_its_grid(tmp_path):
    model = tiny_model()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear) and module is not model.lm_head:
                module.weight.copy_(_on_q4_1_grid(module.weight))
    model.save_pretrained(tmp_path / "base")
    char_tokenizer().save_pretrained(tmp_path / "base")
    recipe = Recipe(base=str(tmp_path / "base"), steps=3, batch=1, seq_len=32, warmup=1)
    report = build_grid_free(recipe, tmp_path / "out")
    assert report["blocks"] > 0 and report["blocks_with_at_most_16_values"] == 0
    assert 0 < report["relative_weight_change"] < 0.1
    assert json.loads((tmp_path / "out" / "reference.json").read_text())["recipe"]["steps"] == 3
    assert (tmp_path / "out" / "config.json").is_file()


def test_the_reference_is_resolved_by_name(monkeypatch, tmp_path):
    monkeypatch.setattr(sources, "grid_free_folder", lambda: tmp_path)
    assert sources.resolve_model(reference.GRID_FREE_NAME) == str(tmp_path)
