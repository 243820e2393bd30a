"""Format version 4: int8-encoded tables and per-projection settings, and `sketchtune mix`."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from safetensors import safe_open

from sketchtune.cli import main
from sketchtune.compression import SketchConfig, compress_model
from sketchtune.errors import SketchtuneError
from sketchtune.format import (
    FormatError,
    SketchFormatConfig,
    decode_int8_tables,
    encode_int8_tables,
    round_int8_tables,
    stored_bits,
)
from sketchtune.hessian import weighted_error
from sketchtune.hub import load, save_sketched
from sketchtune.layers import sketched_layers
from sketchtune.learn import learn_sketch
from sketchtune.mixing import allocate, mix, open_candidate, plan_mix
from tests.conftest import char_tokenizer, tiny_model

CALIB = torch.randint(2, 97, (4, 32), generator=torch.Generator().manual_seed(1))
PROMPT = torch.randint(2, 97, (2, 12), generator=torch.Generator().manual_seed(2))


def sketched(tmp_path, name, family="qwen2", **settings):
    model = tiny_model(family)
    compress_model(model, CALIB, SketchConfig(**settings), progress=False)
    save_sketched(model, char_tokenizer(), tmp_path / name)
    return model, tmp_path / name


@pytest.mark.parametrize("shape", [(1, 4), (7, 3, 16), (5, 2, 8)])
def test_int8_tables_round_trip_exactly_in_bf16(shape):
    values = torch.randn(shape) * torch.logspace(-6, 3, shape[-1])  # tables of many scales
    values[0] = 0.0  # an all-zero table
    levels, exponent = encode_int8_tables(values)
    assert levels.dtype == exponent.dtype == torch.int8 and exponent.shape[-1] == 1
    assert levels.abs().max() <= 127
    decoded = decode_int8_tables(levels, exponent)
    assert torch.equal(decoded.bfloat16().float(), decoded)  # exact in bf16
    # the rounding is a nearest-level one: error at most half a step of 2**exponent
    step = torch.exp2(exponent.float())
    assert ((decoded - values).abs() <= step / 2 + 1e-30).all()
    # the exponent is the smallest that fits: the largest level uses the top half of the range
    big = values.abs().amax(-1) > 0
    assert (levels.abs().amax(-1)[big] >= 63).all()
    assert torch.equal(round_int8_tables(decoded), decoded)  # idempotent


def test_stored_bits_counts_codes_and_tables():
    assert stored_bits(8, 64, 4, 2, "float") == 8 * 64 * 4 + 8 * 2 * 16 * 16
    assert stored_bits(8, 64, 4, 2, "int8") == 8 * 64 * 4 + 8 * 2 * (16 * 8 + 8)


def test_weighted_error_is_the_loss_assign_codes_records():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(300, 64, generator=gen)
    x[:, 5] = 0  # a dead column
    hessian = 2 * x.T @ x / 300
    weight = torch.randn(10, 64, generator=gen)
    sketch = learn_sketch(weight, hessian, bits=4, gpr=2)
    from sketchtune.format import dequantize

    approx = dequantize(sketch.codes, sketch.values)
    torch.testing.assert_close(weighted_error(weight, approx, hessian, 0.01), sketch.row_loss,
                               rtol=1e-4, atol=1e-6)


def test_int8_folder_loads_bit_identical_and_records_the_rounding_loss(tmp_path):
    floats, _ = sketched(tmp_path, "float", bits=4, gpr=2)
    model, folder = sketched(tmp_path, "int8", bits=4, gpr=2, table_encoding="int8")
    with safe_open(str(folder / "model.safetensors"), framework="pt") as handle:
        key = "model.layers.0.self_attn.q_proj"
        assert handle.get_slice(f"{key}.values").get_dtype() == "I8"
        assert handle.get_slice(f"{key}.values_exponent").get_dtype() == "I8"
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert config["format_version"] == 4 and config["table_encoding"] == "int8"
    for values_dtype in (torch.float32, None):
        loaded = load(folder, values_dtype=values_dtype)
        assert not any("exponent" in name for name, _ in loaded.named_buffers())
        with torch.no_grad():
            assert torch.equal(loaded(PROMPT).logits, model(PROMPT).logits)
    # rounding after the codes only adds loss to the first projection (same inputs, same codes)
    first = "model.layers.0.self_attn.q_proj"
    rounded = floats.config.quantization_config.layer_losses[first]
    assert config["layer_losses"][first] > rounded
    same_codes = sketched_layers(floats)[first].codes
    assert torch.equal(same_codes, sketched_layers(model)[first].codes)
    # re-saving keeps the encoding; trained (off-grid) tables are saved as floats, said so
    save_sketched(loaded, None, tmp_path / "again")
    again = json.loads((tmp_path / "again" / "config.json").read_text())["quantization_config"]
    assert again["table_encoding"] == "int8"
    with torch.no_grad():
        sketched_layers(loaded)[first].values.add_(1e-3)
    save_sketched(loaded, None, tmp_path / "trained")
    trained = json.loads((tmp_path / "trained" / "config.json").read_text())["quantization_config"]
    assert trained["table_encoding"] == "float"
    reloaded = load(tmp_path / "trained")
    torch.testing.assert_close(sketched_layers(reloaded)[first].values,
                               sketched_layers(loaded)[first].values.bfloat16().float())


def test_module_settings_are_validated():
    base = dict(quant_method="sketchtune", bits=4, groups_per_row=2, modules=["a", "b"])
    ok = SketchFormatConfig.from_dict({**base, "module_settings": {"a": {"bits": 3}}})
    assert ok.settings_of("a") == (3, 2) and ok.settings_of("b") == (4, 2)
    for bad in ({"c": {"bits": 3}}, {"a": {"bits": 5}}, {"a": {"bits": "3"}},
                {"a": {"table_encoding": "fp4"}}, {"a": {"colour": 1}}, {"a": 3}):
        with pytest.raises(FormatError):
            SketchFormatConfig.from_dict({**base, "module_settings": bad})
    with pytest.raises(FormatError, match="table_encoding"):
        SketchFormatConfig.from_dict({**base, "table_encoding": "fp8"})


def test_mix_takes_each_projection_from_its_allocated_folder(tmp_path):
    folders = [sketched(tmp_path, "s4g2", bits=4, gpr=2)[1],
               sketched(tmp_path, "s3g1", bits=3, gpr=1, table_encoding="int8")[1],
               sketched(tmp_path, "s4g1", bits=4, gpr=1, table_encoding="int8")[1]]
    candidates = [open_candidate(f) for f in folders]
    names = list(candidates[0].shapes)
    weights = sum(a * b for a, b in candidates[0].shapes.values())
    cheapest = sum(min(c.bits_of(n) for c in candidates) for n in names) / weights
    dearest = sum(max(c.bits_of(n) for c in candidates) for n in names) / weights
    budget = (cheapest + dearest) / 2
    plan = plan_mix(candidates, budget)
    expected = allocate([[c.loss_of(n) for c in candidates] for n in names],
                        [[c.bits_of(n) for c in candidates] for n in names], budget * weights)
    assert tuple(plan.choice.values()) == expected.choice
    assert len(set(plan.choice.values())) > 1  # a real mix at this budget
    assert plan.bits_per_weight <= budget

    assert main(["mix", *map(str, folders), "--bits-per-weight", str(budget),
                 "-o", str(tmp_path / "mixed")]) == 0
    mixed = load(tmp_path / "mixed")
    config = mixed.config.quantization_config
    sources = {str(f): load(f) for f in folders}
    for name, index in plan.choice.items():
        ours, theirs = mixed.get_submodule(name), sources[str(folders[index])].get_submodule(name)
        assert (ours.bits, ours.gpr) == (theirs.bits, theirs.gpr)
        assert torch.equal(ours.codes, theirs.codes) and torch.equal(ours.values, theirs.values)
        assert config.layer_losses[name] == candidates[index].loss_of(name)
        bits, gpr = candidates[index].config.settings_of(name)
        assert config.settings_of(name) == (bits, gpr)
        assert config.table_encoding_of(name) == candidates[index].config.table_encoding
    stored = sum(stored_bits(*candidates[0].shapes[n], *config.settings_of(n),
                             config.table_encoding_of(n)) for n in names)
    assert stored == plan.allocation.bits
    with torch.no_grad():
        assert torch.isfinite(mixed(PROMPT).logits).all()


def test_mix_refuses_other_bases_and_budgets_below_the_cheapest(tmp_path, capsys):
    _, ours = sketched(tmp_path, "ours", bits=4, gpr=2)
    _, other = sketched(tmp_path, "other", bits=3, gpr=2)
    model = tiny_model("qwen2", seed=7)  # another base of the same shapes
    compress_model(model, CALIB, SketchConfig(bits=4, gpr=2), progress=False)
    save_sketched(model, None, tmp_path / "stranger")
    candidates = [open_candidate(ours), open_candidate(tmp_path / "stranger")]
    plan = plan_mix(candidates, 100.0)
    half = {name: i % 2 for i, name in enumerate(plan.choice)}  # both folders used
    with pytest.raises(SketchtuneError, match="not sketches of one model"):
        mix(replace(plan, choice=half))
    assert main(["mix", str(ours), str(other), "--bits-per-weight", "1", "-o",
                 str(tmp_path / "none")]) == 2
    assert "below the cheapest" in capsys.readouterr().err
    assert not (tmp_path / "none").exists()
