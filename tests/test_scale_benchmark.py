"""benchmarks/scale.py: its shapes are the models it names, and its pipeline runs end to end."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import scale  # noqa: E402


@pytest.mark.parametrize("shape", ["smollm2-135m", "smollm2-360m", "llama-3.2-1b"])
def test_shapes_have_the_published_parameter_counts(shape):
    assert scale.counts(shape)["parameters"] == scale.PUBLISHED_PARAMETERS[shape]


def test_llama3_8b_extrapolation_target_is_llama3_8b():
    counts = scale.counts(scale.LLAMA3_8B)
    assert counts["parameters"] == scale.PUBLISHED_PARAMETERS["llama-3-8b"]
    assert not counts["tied"]
    assert counts["embedding_head_parameters"] == 2 * 128256 * 4096


def test_rows_are_reused_only_with_their_own_settings():
    args = scale.parse_args([])
    changed = scale.parse_args(["--samples", "8"])
    assert scale.row_settings("compress", args) != scale.row_settings("compress", changed)
    assert scale.row_settings("decode", args) == scale.row_settings("decode", changed)


@pytest.mark.slow
def test_smoke_run_writes_every_row_and_a_rerun_skips_them(tmp_path, capsys):
    scale.main(["--smoke", "--work", str(tmp_path)])
    results = json.loads((tmp_path / "scale-smoke.json").read_text())
    assert set(results["shapes"]["tiny"]["rows"]) == set(scale.MEASURES)
    assert (tmp_path / "scale-smoke.csv").is_file() and (tmp_path / "scale-smoke.png").is_file()
    capsys.readouterr()
    scale.main(["--smoke", "--work", str(tmp_path)])
    assert "already measured with these settings (skipped)" in capsys.readouterr().out
