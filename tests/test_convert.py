"""Published SketchTune checkpoints: written here exactly as the authors' code writes them (plain
`pickle.dump` of a dict of tensors), converted, and checked against their own gather formula."""

import os
import pickle
import subprocess
import warnings
from collections import OrderedDict

import pytest
import torch
import transformers
from torch import nn

import sketchtune
from sketchtune.cli import main
from sketchtune.convert import convert_base, convert_task_sketch, read_published
from sketchtune.errors import SketchtuneError
from sketchtune.layers import sketched_layers
from tests.conftest import tiny_model

LEFT_OUT = "model.layers.1.mlp.down_proj"  # a projection the published file does not sketch


def block_linears(model: nn.Module) -> dict[str, nn.Linear]:
    return {n: m for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and n.startswith("model.layers.")}


def published_entry(rows: int, cols: int, gpr: int, dtype: torch.dtype, gen: torch.Generator):
    """(grid, codes) as their base files hold them: codes two per byte, high nibble first."""
    grid = torch.randn(rows, gpr, 16, generator=gen).to(dtype)
    codes = torch.randint(0, 16, (rows, gpr, cols // gpr // 2, 2), generator=gen)
    packed = (codes[..., 0] * 16 + codes[..., 1]).to(torch.uint8)
    if gpr == 1:
        return grid[:, 0], packed[:, 0]
    return grid, packed


def publish_base(gpr: int, dtype: torch.dtype, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {
        name: published_entry(lin.out_features, lin.in_features, gpr, dtype, gen)
        for name, lin in block_linears(tiny_model()).items() if name != LEFT_OUT
    }


def dump(obj: object, path) -> object:
    with open(path, "wb") as handle:
        pickle.dump(obj, handle)  # what their save code does
    return path


def published_weight(grid: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """Their gather kernel on the CPU: one table per (row, group) block; byte j of a block
    gives columns 2j (high nibble) and 2j + 1 (low nibble). The grid is cast as their loader
    casts it, to the model's bf16."""
    grid = grid.to(torch.bfloat16)
    if grid.dim() == 2:
        grid, packed = grid[:, None], packed[:, None]
    rows, gpr, half = packed.shape
    tables = grid.reshape(rows * gpr, 16)
    block_bytes = packed.reshape(rows * gpr, half).long()
    block = torch.arange(rows * gpr)[:, None]
    out = torch.empty(rows * gpr, 2 * half, dtype=torch.bfloat16)
    out[:, 0::2] = tables[block, block_bytes // 16]
    out[:, 1::2] = tables[block, block_bytes % 16]
    return out.reshape(rows, gpr * 2 * half)


@pytest.fixture
def converted(tmp_path, tiny_model_dir):
    """A gpr-4 fp16 published base converted into a folder: (folder, published dict)."""
    published = publish_base(4, torch.float16)
    out = tmp_path / "converted"
    convert_base(dump(published, tmp_path / "base.pkl"), str(tiny_model_dir), out)
    return out, published


@pytest.mark.parametrize("gpr,dtype", [(1, torch.float16), (1, torch.bfloat16),
                                       (4, torch.float16), (4, torch.bfloat16)])
def test_base_converts_to_the_published_weights_bit_for_bit(tmp_path, tiny_model_dir, gpr, dtype):
    published = publish_base(gpr, dtype)
    out = tmp_path / "converted"
    summary = convert_base(dump(published, tmp_path / "base.pkl"), str(tiny_model_dir), out)
    assert (summary["gpr"], summary["bits"], summary["sketched_layers"]) == (gpr, 4, 13)

    model = sketchtune.load(out)
    quant = model.config.quantization_config
    assert quant.modules == sorted(published) and quant.dense_projections == [LEFT_OUT]
    assert quant.learning == {"source": "published SketchTune checkpoint", "file": "base.pkl"}
    layers = sketched_layers(model)
    for name, (grid, codes) in published.items():
        assert torch.equal(layers[name].dequantized_weight(), published_weight(grid, codes).float())
    dense = tiny_model()  # the base supplies everything else (stored in bf16)
    for name in (LEFT_OUT + ".weight", "model.embed_tokens.weight", "model.norm.weight"):
        expected = dense.get_parameter(name).detach().to(torch.bfloat16).float()
        assert torch.equal(model.get_parameter(name).detach(), expected)


def test_base_that_cannot_be_streamed_is_loaded_whole(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setattr("sketchtune.convert.open_source_streaming", lambda base: None)
    published = publish_base(1, torch.float16)
    out = tmp_path / "converted"
    convert_base(dump(published, tmp_path / "base.pkl"), str(tiny_model_dir), out)
    layers = sketched_layers(sketchtune.load(out))
    for name, (grid, codes) in published.items():
        assert torch.equal(layers[name].dequantized_weight(), published_weight(grid, codes).float())


def test_converted_folder_loads_through_transformers(converted):
    folder, _ = converted
    model = transformers.AutoModelForCausalLM.from_pretrained(folder)  # after `import sketchtune`
    assert len(sketched_layers(model)) == 13
    logits = model(torch.randint(2, 97, (2, 12))).logits
    assert logits.shape == (2, 12, 128) and torch.isfinite(logits).all()


def test_finetuned_checkpoint_becomes_a_task_sketch_of_its_base(tmp_path, converted):
    folder, published = converted
    gen = torch.Generator().manual_seed(7)
    # What their save_pretrained writes: each Parameter's data, (rows, gpr, 16), in bf16.
    tuned = {name: (grid.to(torch.bfloat16) + 0.01 * torch.randn(grid.shape, generator=gen)
                    .to(torch.bfloat16)).to(torch.bfloat16)
             for name, (grid, _) in published.items()}
    task = tmp_path / "task"
    summary = convert_task_sketch(dump(tuned, tmp_path / "sketched_params.pkl"), folder, task)
    base = sketchtune.load(folder)
    assert summary["base_fingerprint"] == base.config.quantization_config.fingerprint

    model = sketchtune.load(folder, task_sketch=task)
    layers = sketched_layers(model)
    for name, (_, codes) in published.items():
        expected = published_weight(tuned[name], codes).float()
        assert torch.equal(layers[name].dequantized_weight(), expected)
    assert torch.isfinite(model(torch.randint(2, 97, (1, 8))).logits).all()


def test_finetuned_grid_of_the_wrong_shape_names_its_module(tmp_path, converted):
    folder, published = converted
    tuned = {name: grid for name, (grid, _) in published.items()}
    tuned["model.layers.0.self_attn.k_proj"] = torch.zeros(32, 2, 16, dtype=torch.bfloat16)
    with pytest.raises(SketchtuneError, match="model.layers.0.self_attn.k_proj has shape"):
        convert_task_sketch(dump(tuned, tmp_path / "t.pkl"), folder, tmp_path / "task")
    del tuned["model.layers.0.self_attn.k_proj"]
    with pytest.raises(SketchtuneError, match="no grid for 1 sketched layers"):
        convert_task_sketch(dump(tuned, tmp_path / "t.pkl"), folder, tmp_path / "task")
    assert not (tmp_path / "task").exists()


@pytest.mark.parametrize("edit,message", [
    (lambda p: p.update({"model.layers.0.self_attn.q_proj": published_entry(
        65, 64, 4, torch.float16, torch.Generator())}), "65 rows, the base's Linear has 64"),
    (lambda p: p.update({"model.layers.0.self_attn.q_proj": (
        p["model.layers.0.self_attn.q_proj"][0], torch.zeros(64, 4, 4, dtype=torch.uint8))}),
     "codes of model.layers.0.self_attn.q_proj have shape (64, 4, 4)"),
    (lambda p: p.update({"model.layers.0.mlp.up_proj": (
        p["model.layers.0.mlp.up_proj"][0], p["model.layers.0.mlp.up_proj"][1].long())}),
     "codes of model.layers.0.mlp.up_proj are torch.int64, not uint8"),
    (lambda p: p.update({"model.layers.0.self_attn.q_proj": published_entry(
        64, 63 * 2, 3, torch.float16, torch.Generator())}), "groups per row must be one of"),
    (lambda p: p.update({"model.layers.9.self_attn.q_proj": p["model.layers.0.self_attn.q_proj"]}),
     "model.layers.9.self_attn.q_proj is not a Linear projection"),
    (lambda p: p.update({"lm_head": p["model.layers.0.self_attn.q_proj"]}),
     "lm_head is not a Linear projection"),
])
def test_base_that_does_not_match_the_dense_model_is_one_clear_error(
    tmp_path, tiny_model_dir, edit, message
):
    published = publish_base(4, torch.float16)
    edit(published)
    with pytest.raises(SketchtuneError, match=message.replace("(", r"\(").replace(")", r"\)")):
        convert_base(dump(published, tmp_path / "b.pkl"), str(tiny_model_dir), tmp_path / "o")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_every_pickle_protocol_reads_back_the_same_tensors(tmp_path, protocol):
    grid = torch.randn(6, 16).to(torch.bfloat16)[::2]  # a strided view of a larger storage
    codes = torch.randint(0, 256, (3, 4, 2), dtype=torch.uint8)
    path = tmp_path / "p.pkl"
    path.write_bytes(pickle.dumps({"a": (grid, codes)}, protocol=protocol))
    (read_grid, read_codes), = read_published(path, with_codes=True).values()
    assert torch.equal(read_grid, grid) and torch.equal(read_codes, codes)


class Payload:
    """Unpickling this calls `function(*args)`: what a hostile checkpoint would do."""

    def __init__(self, function, *args):
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


def payloads(marker) -> dict[str, Payload]:
    inner = pickle.dumps(Payload(os.system, f"touch {marker}"), protocol=2)
    return {
        "os.system": Payload(os.system, f"touch {marker}"),
        "eval": Payload(eval, f"open({str(marker)!r}, 'w').close()"),
        # torch's own _load_from_bytes would run this through torch.load(weights_only=False)
        "nested torch.load": Payload(torch.storage._load_from_bytes, inner),
        "subprocess.Popen": Payload(subprocess.Popen, ["touch", str(marker)]),
    }


@pytest.mark.parametrize("kind", ["os.system", "eval", "nested torch.load", "subprocess.Popen"])
def test_hostile_pickles_are_refused_and_nothing_runs(tmp_path, tiny_model_dir, kind):
    live = tmp_path / "live"  # the payload really runs under a plain pickle.load
    try:
        loaded = pickle.loads(pickle.dumps(payloads(live)[kind]))
    except RuntimeError:  # torch.load ran it as the file's "magic number", then gave up
        loaded = None
    if isinstance(loaded, subprocess.Popen):
        loaded.wait()
    assert live.exists()

    marker = tmp_path / "marker"
    codes = torch.zeros(64, 4, 8, dtype=torch.uint8)
    hostile = {"model.layers.0.self_attn.q_proj": (payloads(marker)[kind], codes)}
    path = dump(hostile, tmp_path / "hostile.pkl")
    with pytest.raises(SketchtuneError, match="refused|not a plain torch storage") as info:
        convert_base(path, str(tiny_model_dir), tmp_path / "o")
    assert "\n" not in str(info.value)
    assert not marker.exists() and not (tmp_path / "o").exists()


def test_tensor_reaching_past_its_storage_is_refused(tmp_path):
    with warnings.catch_warnings():  # TypedStorage is deprecated, but it is what tensors pickle
        warnings.simplefilter("ignore", UserWarning)
        small = torch.zeros(4).storage()  # pickled through torch.storage._load_from_bytes
    rebuild = Payload(torch._utils._rebuild_tensor_v2, small, 0, (100,), (1,), False, OrderedDict())
    path = dump({"a": rebuild}, tmp_path / "big.pkl")
    with pytest.raises(SketchtuneError, match="past the end of its storage"):
        read_published(path, with_codes=False)


@pytest.mark.parametrize("content,message", [
    (b"hello, this is text", "is not a readable pickle"),
    (b"PK\x03\x04 and the rest of an archive", "zip archive"),
    (pickle.dumps([torch.zeros(2)]), "holds a list, not a dict"),
    (pickle.dumps({"a": (torch.zeros(2, 16), torch.zeros(2, 8, dtype=torch.uint8))}),
     "a base checkpoint"),
    (pickle.dumps({"a": "text"}), "a holds a str, not a grid tensor"),
])
def test_files_that_are_not_finetuned_checkpoints(tmp_path, content, message):
    path = tmp_path / "x.pkl"
    path.write_bytes(content)
    with pytest.raises(SketchtuneError, match=message):
        read_published(path, with_codes=False)


def test_finetuned_file_given_as_a_base_says_what_it_is(tmp_path):
    path = dump({"a": torch.zeros(2, 16)}, tmp_path / "sketched_params.pkl")
    with pytest.raises(SketchtuneError, match="a fine-tuned checkpoint"):
        read_published(path, with_codes=True)


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_converts_a_base_and_a_finetuned_checkpoint(tmp_path, tiny_model_dir, capsys):
    published = publish_base(2, torch.bfloat16)
    base_pkl = dump(published, tmp_path / "llama-int4-gpr2.pkl")
    argv = ("convert", base_pkl, "--base", tiny_model_dir, "-o", tmp_path / "s")
    code, out, err = run(capsys, *argv)
    assert code == 0, err
    assert '"gpr": 2' in out
    tuned = dump({n: g for n, (g, _) in published.items()}, tmp_path / "sketched_params.pkl")
    argv = ("convert", tuned, "--sketched", tmp_path / "s", "-o", tmp_path / "t")
    code, out, err = run(capsys, *argv)
    assert code == 0, err
    assert (tmp_path / "t" / "values.safetensors").is_file()


def test_cli_refuses_a_hostile_file_with_one_error_line(tmp_path, tiny_model_dir, capsys):
    marker = tmp_path / "marker"
    path = dump({"x": payloads(marker)["os.system"]}, tmp_path / "evil.pkl")
    code, out, err = run(capsys, "convert", path, "--base", tiny_model_dir, "-o", tmp_path / "o")
    assert code == 2 and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "posix.system" in lines[0]
    assert not marker.exists() and not (tmp_path / "o").exists()
