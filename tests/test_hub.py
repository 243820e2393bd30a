import json

import pytest
import torch

from sketchtune.compression import SketchConfig, compress_model
from sketchtune.errors import SketchtuneError
from sketchtune.hub import WEIGHTS_NAME, load, save_sketched
from sketchtune.layers import SketchLinear
from tests.conftest import char_tokenizer, tiny_model

CALIB = torch.randint(2, 97, (4, 32), generator=torch.Generator().manual_seed(1))
PROMPT = torch.randint(2, 97, (2, 12), generator=torch.Generator().manual_seed(2))


@pytest.fixture
def sketched_dir(tmp_path):
    model = tiny_model("qwen2")  # biases too
    compress_model(model, CALIB, SketchConfig(bits=3, gpr=2), progress=False)
    save_sketched(model, char_tokenizer(), tmp_path / "sketched")
    return model, tmp_path / "sketched"


def test_reload_gives_bit_identical_logits_and_generates(sketched_dir):
    model, folder = sketched_dir
    loaded = load(folder)
    with torch.no_grad():
        assert torch.equal(loaded(PROMPT).logits, model(PROMPT).logits)
    out = loaded.generate(PROMPT[:1], max_new_tokens=5, do_sample=False, pad_token_id=1)
    assert out.shape == (1, 17)
    assert isinstance(loaded.model.layers[1].self_attn.q_proj, SketchLinear)
    assert loaded.model.layers[1].self_attn.q_proj.values.dtype == torch.float32


def test_values_kept_as_stored_give_the_same_model_for_inference(sketched_dir):
    _, folder = sketched_dir
    widened, stored = load(folder), load(folder, values_dtype=None)
    layer = stored.model.layers[1].self_attn.q_proj
    assert layer.values.dtype == torch.bfloat16  # what the file holds
    wide = widened.model.layers[1].self_attn.q_proj
    torch.testing.assert_close(layer.values.float(), wide.values)
    with torch.no_grad():  # one prompt row: the GEMV reads the bf16 tables; two: the tiled path
        for prompt in (PROMPT[:1], PROMPT):
            torch.testing.assert_close(
                stored(prompt).logits, widened(prompt).logits, rtol=1e-4, atol=1e-4
            )
    greedy = dict(max_new_tokens=6, do_sample=False, pad_token_id=1)
    prompt = PROMPT[:1]
    assert torch.equal(stored.generate(prompt, **greedy), widened.generate(prompt, **greedy))


def test_tied_embeddings_survive_the_round_trip(tmp_path):
    model = tiny_model("llama")
    compress_model(model, CALIB, SketchConfig(), progress=False)
    save_sketched(model, None, tmp_path / "m")
    loaded = load(tmp_path / "m")
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    with torch.no_grad():
        assert torch.equal(loaded(PROMPT).logits, model(PROMPT).logits)


def test_loading_never_initialises_dense_weights(sketched_dir, monkeypatch):
    _, folder = sketched_dir
    real_init = torch.nn.init.normal_

    def no_real_init(tensor, *args, **kwargs):
        assert tensor.is_meta, "a dense weight was initialised while loading"
        return real_init(tensor, *args, **kwargs)

    monkeypatch.setattr(torch.nn.init, "normal_", no_real_init)
    load(folder)


def test_files_are_safetensors_and_small(sketched_dir):
    _, folder = sketched_dir
    files = sorted(p.name for p in folder.iterdir())
    assert WEIGHTS_NAME in files and not any(f.endswith((".bin", ".pt", ".pkl")) for f in files)
    quant = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert quant["quant_method"] == "sketchtune" and quant["bits"] == 3
    assert len(quant["fingerprint"]) == 32


def test_truncated_checkpoint_is_a_clear_error(sketched_dir):
    _, folder = sketched_dir
    weights = folder / WEIGHTS_NAME
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(SketchtuneError, match="corrupt or truncated"):
        load(folder)


def test_checkpoint_that_does_not_match_its_config_is_a_clear_error(sketched_dir):
    _, folder = sketched_dir
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"]["bits"] = 4
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(SketchtuneError, match="shape"):
        load(folder)


def test_existing_output_needs_force(sketched_dir):
    model, folder = sketched_dir
    with pytest.raises(SketchtuneError, match="already exists"):
        save_sketched(model, None, folder)
    save_sketched(model, None, folder, force=True)
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]


def test_a_dense_folder_is_not_a_sketched_model(tiny_model_dir):
    with pytest.raises(SketchtuneError, match="not a sketched model"):
        load(tiny_model_dir)
