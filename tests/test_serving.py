"""Inference-only model changes: fused projections against the unfused sketched model."""

import pytest
import torch

from sketchtune.compression import SketchConfig, compress_model
from sketchtune.layers import SketchLinear
from sketchtune.serving import FusedPart, FusedSketchProjections, fuse_projections
from tests.conftest import tiny_model


def sketched(family: str, values_dtype: torch.dtype = torch.float32):
    model = tiny_model(family)
    calibration = torch.randint(2, 97, (2, 16), generator=torch.Generator().manual_seed(1))
    compress_model(model, calibration, SketchConfig(bits=4, gpr=2), progress=False)
    for layer in model.modules():
        if isinstance(layer, SketchLinear):
            layer.values.data = layer.values.data.to(values_dtype)
    return model


@pytest.mark.parametrize("family", ["llama", "qwen2"])  # qwen2: q, k, v carry biases
def test_fused_projections_give_the_unfused_logits_exactly(family):
    model = sketched(family, torch.bfloat16)
    ids = torch.randint(2, 97, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        assert fuse_projections(model) == 2 * model.config.num_hidden_layers
        got = model(input_ids=ids).logits
    # each output row reads only its own codes and tables: stacking rows changes no sum
    assert torch.equal(got, expected)
    attention = model.model.layers[0].self_attn
    assert isinstance(attention.q_proj, FusedPart)
    assert isinstance(attention.qkv_proj, FusedSketchProjections)
    assert attention.qkv_proj.sizes == [64, 32, 32]


def test_fused_decode_keeps_tokens_and_holds_no_outputs_after_a_step():
    model = sketched("llama")
    ids = torch.randint(2, 97, (1, 8), generator=torch.Generator().manual_seed(2))
    options = dict(max_new_tokens=10, min_new_tokens=10, do_sample=False, pad_token_id=1)
    with torch.no_grad():
        expected = model.generate(input_ids=ids, **options)
        fuse_projections(model)
        got = model.generate(input_ids=ids, **options)
    assert torch.equal(got, expected)
    for module in model.modules():
        if isinstance(module, FusedSketchProjections):
            assert module._outputs == [] and module._input is None


def test_a_part_called_alone_or_again_gets_its_own_rows():
    torch.manual_seed(0)
    parts = [SketchLinear(32, n, bits=4, gpr=2) for n in (16, 8)]
    for p in parts:
        p.codes.random_(0, 256)
        p.values.data.normal_()
    fused = FusedSketchProjections(parts)
    x, other = torch.randn(3, 32), torch.randn(3, 32)
    with torch.no_grad():
        first = fused.part_output(x, 0)
        again = fused.part_output(x, 0)  # before part 1 took its output
        switched = fused.part_output(other, 1)  # a new input: recomputed
        x.mul_(2)  # same tensor, new contents: recomputed
        changed = fused.part_output(x, 1)
        for got, layer, inp in (
            (first, parts[0], x / 2), (again, parts[0], x / 2), (switched, parts[1], other),
            (changed, parts[1], x),
        ):
            reference = inp @ layer.dequantized_weight().T
            torch.testing.assert_close(got, reference, rtol=1e-5, atol=1e-5)
