import pytest
import torch
from torch import nn

from sketchtune.compression import SketchConfig, _linear_steps, compress_model, find_decoder_blocks
from sketchtune.errors import SketchtuneError
from sketchtune.layers import SketchLinear
from tests.conftest import tiny_model

CALIB = torch.randint(2, 97, (8, 48), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "gemma"])
def test_every_projection_is_sketched_in_every_family(family):
    model = tiny_model(family)
    x = torch.randint(2, 97, (2, 20))
    with torch.no_grad():
        reference = model(x).logits
    names = compress_model(model, CALIB, SketchConfig(bits=4, gpr=2), progress=False)
    assert len(names) == 2 * 7
    linears = [n for n, m in model.named_modules() if type(m) is nn.Linear]
    assert linears == ["lm_head"]  # only the output head stays dense
    with torch.no_grad():
        out = model(x).logits
    rel = (out - reference).norm() / reference.norm()
    assert rel < 0.15, rel
    assert model.config.quantization_config.modules == names


def test_steps_group_projections_that_share_an_input():
    model = tiny_model("llama")
    _, blocks = find_decoder_blocks(model)
    captured = {}

    def grab(_m, args, kwargs):
        captured["h"], captured["kw"] = args[0], kwargs
        raise RuntimeError

    handle = blocks[0].register_forward_pre_hook(grab, with_kwargs=True)
    with pytest.raises(RuntimeError):
        model(CALIB[:2])
    handle.remove()
    steps = _linear_steps(blocks[0], captured["h"], captured["kw"])
    assert steps == [
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
        ["self_attn.o_proj"],
        ["mlp.gate_proj", "mlp.up_proj"],
        ["mlp.down_proj"],
    ]


def _logit_error(model, reference, x):
    with torch.no_grad():
        return ((model(x).logits - reference) ** 2).mean().item()


def test_data_aware_beats_plain_kmeans_on_calibration_like_text():
    x = CALIB[:4]
    with torch.no_grad():
        reference = tiny_model()(x).logits
    aware, plain = tiny_model(), tiny_model()
    compress_model(aware, CALIB, SketchConfig(bits=2, gpr=1), progress=False)
    compress_model(plain, None, SketchConfig(bits=2, gpr=1, data_aware=False), progress=False)
    assert _logit_error(aware, reference, x) < _logit_error(plain, reference, x)


def test_values_are_trainable_codes_are_not():
    model = tiny_model()
    compress_model(model, CALIB, SketchConfig(), progress=False)
    layer = model.model.layers[0].mlp.down_proj
    assert isinstance(layer, SketchLinear)
    assert layer.values.requires_grad and layer.codes.dtype == torch.uint8


def test_model_without_blocks_is_a_clear_error():
    with pytest.raises(SketchtuneError, match="no decoder blocks"):
        compress_model(nn.Sequential(nn.Embedding(4, 4)), CALIB, SketchConfig(), progress=False)


def test_bad_settings_are_clear_errors():
    with pytest.raises(ValueError, match="bits"):
        SketchConfig(bits=5)
    with pytest.raises(ValueError, match="gpr"):
        SketchConfig(gpr=3)
