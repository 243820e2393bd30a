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


def test_compress_on_an_explicit_device_matches_the_default():
    # Device-generic code path (blocks moved to `device`, activations stored where they fit):
    # on this CPU-only machine both runs are on the CPU, and must agree exactly.
    from sketchtune.devices import resolve_device

    calib = torch.randint(2, 97, (4, 32), generator=torch.Generator().manual_seed(1))
    default, explicit = tiny_model(), tiny_model()
    compress_model(default, calib, SketchConfig(bits=4, gpr=2), progress=False)
    compress_model(explicit, calib, SketchConfig(bits=4, gpr=2), progress=False,
                   device=resolve_device("cpu"))
    for (name, a), (_, b) in zip(default.state_dict().items(), explicit.state_dict().items(),
                                 strict=True):
        assert torch.equal(a, b), name


def test_device_names_are_checked():
    from sketchtune.devices import resolve_device

    assert resolve_device("auto").type in ("cpu", "cuda")
    with pytest.raises(SketchtuneError, match="device must be"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(SketchtuneError, match="no CUDA device"):
            resolve_device("cuda:1")


def test_activations_move_to_the_cpu_only_when_they_do_not_fit(monkeypatch):
    from sketchtune import compression

    block = tiny_model().model.layers[0]
    hidden = torch.zeros(4, 32, 64)
    inputs = [(hidden, {"position_embeddings": (torch.zeros(4, 32, 16), torch.zeros(4, 32, 16))})]
    # inputs and outputs of the block (2 x hidden) plus the keyword tensors
    assert compression.activation_bytes(inputs) == 4 * (2 * hidden.numel() + 2 * 4 * 32 * 16)
    gpu = torch.device("cuda", 0)
    monkeypatch.setattr(compression, "free_bytes", lambda _device: 10**12)
    assert compression.activation_store(gpu, inputs, block) == gpu
    monkeypatch.setattr(compression, "free_bytes", lambda _device: 10**5)
    assert compression.activation_store(gpu, inputs, block) == torch.device("cpu")


def test_each_layer_loss_is_recorded_in_the_format_config():
    model = tiny_model()
    q_proj = model.model.layers[0].self_attn.q_proj
    weight = q_proj.weight.detach().clone()
    seen = []
    handle = q_proj.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    with torch.no_grad():
        model(CALIB)  # block 0 sees dense inputs, so this is the Hessian its first step uses
    handle.remove()
    x = torch.cat(seen).reshape(-1, weight.shape[1])
    hessian = 2 / x.shape[0] * x.T @ x
    damped = hessian + 0.01 * hessian.diagonal().mean() * torch.eye(weight.shape[1])
    names = compress_model(model, CALIB, SketchConfig(bits=4, gpr=2), progress=False)
    losses = model.config.quantization_config.layer_losses
    assert sorted(losses) == sorted(names) and all(v > 0 for v in losses.values())
    error = weight - model.model.layers[0].self_attn.q_proj.dequantized_weight()
    expected = float(((error @ damped) * error).sum() / 2)  # learn.LayerSketch's identity
    assert losses["model.layers.0.self_attn.q_proj"] == pytest.approx(expected, rel=0.05)
    plain = tiny_model()
    compress_model(plain, None, SketchConfig(data_aware=False), progress=False)
    assert plain.config.quantization_config.layer_losses == {}
