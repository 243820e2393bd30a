"""Streaming compression: the same sketch as compressing the fully loaded model, without ever
holding more than one dense block."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from sketchtune.api import _streamed_blocks, compress_to_folder
from sketchtune.compression import STORAGE_DTYPE, SketchConfig, compress_model
from sketchtune.errors import SketchtuneError
from sketchtune.streaming import open_streaming
from tests.conftest import char_tokenizer, tiny_model

CALIB = torch.randint(2, 97, (4, 32), generator=torch.Generator().manual_seed(0))
CONFIG = SketchConfig(bits=4, gpr=2)


def save_dense(folder, family="llama", **kwargs):
    tiny_model(family).save_pretrained(folder, **kwargs)
    char_tokenizer().save_pretrained(folder)
    return folder


def compress_loaded(folder):
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    compress_model(model, CALIB, CONFIG, progress=False)
    return model


def compress_streamed(folder, watch=None):
    stream = open_streaming(folder)
    assert stream is not None
    stream.load_outside_blocks()
    blocks = _streamed_blocks(stream)  # as compress_to_folder streams

    def before_block(index):
        blocks(index)
        if watch is not None:
            watch(stream.model, index)

    compress_model(stream.model, CALIB, CONFIG, progress=False, before_block=before_block)
    stream.load_outside_blocks(STORAGE_DTYPE)  # as compress_to_folder reads them for the save
    stream.check_complete()
    return stream.model


def assert_same_state(a, b):
    # Equal values; the streamed model's parts outside the blocks are read back in the storage
    # dtype, the loaded model keeps them in fp32 after rounding them to it.
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert sa[name].is_floating_point() or sa[name].dtype == sb[name].dtype, name
        assert torch.equal(sa[name].to(sb[name].dtype), sb[name]), name


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "gemma"])
def test_streamed_compression_equals_compressing_the_loaded_model(tmp_path, family):
    folder = save_dense(tmp_path / family, family)
    assert_same_state(compress_streamed(folder), compress_loaded(folder))


@pytest.mark.parametrize("family,tied", [("llama", True), ("mistral", False)])
def test_only_the_current_block_is_dense_while_blocks_are_sketched(tmp_path, family, tied):
    folder = save_dense(tmp_path / "m", family)
    seen = []

    def watch(model, index):
        layers = model.model.layers
        dense = [not any(p.is_meta for p in block.parameters()) for block in layers]
        outside = [model.model.embed_tokens.weight, model.lm_head.weight, model.model.norm.weight]
        seen.append((dense, [p.is_meta for p in outside]))

    model = compress_streamed(folder, watch)
    assert seen == [([True, False], [True] * 3), ([True, True], [True] * 3)]
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied


def test_sharded_checkpoint_streams(tmp_path):
    folder = save_dense(tmp_path / "sharded", max_shard_size="20KB")
    assert (folder / "model.safetensors.index.json").is_file()
    assert_same_state(compress_streamed(folder), compress_loaded(folder))


def test_checkpoint_without_base_model_prefix_streams(tmp_path):
    folder = save_dense(tmp_path / "m")
    state = load_file(folder / "model.safetensors")
    save_file({k.removeprefix("model."): v for k, v in state.items()}, folder / "model.safetensors",
              metadata={"format": "pt"})
    stream = open_streaming(folder)
    assert stream is not None
    stream.load_outside_blocks()
    for index in range(2):
        stream.load_block(index)
    stream.check_complete()
    loaded = stream.model.state_dict()
    for name, tensor in state.items():
        assert torch.equal(loaded[name], tensor), name
    assert stream.model.lm_head.weight is stream.model.model.embed_tokens.weight  # still tied


def test_unmatched_names_fall_back_to_whole_loading(tmp_path):
    folder = save_dense(tmp_path / "m")
    state = load_file(folder / "model.safetensors")
    save_file({k.replace("mlp", "ffn"): v for k, v in state.items()}, folder / "model.safetensors",
              metadata={"format": "pt"})
    assert open_streaming(folder) is None


def test_folder_without_safetensors_is_not_streamed(tmp_path):
    folder = save_dense(tmp_path / "m")
    (folder / "model.safetensors").unlink()
    assert open_streaming(folder) is None


def test_truncated_shard_is_a_clear_error(tmp_path):
    folder = save_dense(tmp_path / "sharded", max_shard_size="20KB")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    last = folder / sorted(set(index["weight_map"].values()))[-1]
    last.write_bytes(last.read_bytes()[:-100])
    with pytest.raises(SketchtuneError, match="corrupt or truncated"):
        stream = open_streaming(folder)
        stream.load_outside_blocks()
        for i in range(2):
            stream.load_block(i)


def test_compress_to_folder_streams_and_reloads(tmp_path):
    from sketchtune.api import load

    folder = save_dense(tmp_path / "m")
    summary = compress_to_folder(
        str(folder), tmp_path / "out", CONFIG, samples=4, seq_len=32, progress=False
    )
    assert summary["streamed"] is True
    assert summary["peak_rss_mb"] > 0
    reloaded = load(tmp_path / "out")
    assert reloaded.config.quantization_config.modules
    x = torch.randint(2, 97, (1, 12))
    with torch.no_grad():
        assert torch.isfinite(reloaded(x).logits).all()
