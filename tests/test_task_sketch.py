import pytest
import torch
from transformers import AutoModelForCausalLM

from sketchtune.api import load
from sketchtune.compression import SketchConfig, compress_model
from sketchtune.errors import SketchtuneError
from sketchtune.export import export_dense
from sketchtune.hub import save_sketched
from sketchtune.task_sketch import (
    apply_task_sketch,
    extract_task_sketch,
    load_task_sketch,
    save_task_sketch,
)
from tests.conftest import char_tokenizer, tiny_model

CALIB = torch.randint(2, 97, (4, 32), generator=torch.Generator().manual_seed(1))
PROMPT = torch.randint(2, 97, (1, 10), generator=torch.Generator().manual_seed(3))


def sketched_base(tmp_path, seed=0, name="base"):
    model = tiny_model(seed=seed)
    compress_model(model, CALIB, SketchConfig(bits=4, gpr=2), progress=False)
    save_sketched(model, char_tokenizer(), tmp_path / name)
    return tmp_path / name


def nudge(model, scale):
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".values"):
                param.add_(scale)


def logits(model):
    with torch.no_grad():
        return model(PROMPT).logits


def test_task_sketches_swap_on_one_base_and_reload(tmp_path):
    base_dir = sketched_base(tmp_path)
    model = load(base_dir)
    base_logits = logits(model)
    base = extract_task_sketch(model)
    nudge(model, 0.01)
    task_a = extract_task_sketch(model, info={"task": "a"})
    save_task_sketch(task_a, tmp_path / "a")
    nudge(model, 0.02)
    task_b_logits = logits(model)

    apply_task_sketch(model, base)
    # the base's fp32-widened tables are exact in bf16: back into its own bf16 storage
    assert {p.dtype for n, p in model.named_parameters() if n.endswith(".values")} == {
        torch.bfloat16}
    assert torch.equal(logits(model), base_logits)
    apply_task_sketch(model, load_task_sketch(tmp_path / "a"))
    a_logits = logits(model)
    assert not torch.equal(a_logits, base_logits) and not torch.equal(a_logits, task_b_logits)
    assert torch.equal(logits(load(base_dir, task_sketch=tmp_path / "a")), a_logits)
    assert load_task_sketch(tmp_path / "a").info == {"task": "a"}


def test_task_sketch_on_a_base_with_bf16_tables_keeps_its_fp32_values(tmp_path):
    base_dir = sketched_base(tmp_path)
    trained = load(base_dir, values_dtype=torch.float32)
    nudge(trained, 1e-3)  # below bf16 resolution for most entries
    save_task_sketch(extract_task_sketch(trained), tmp_path / "t")
    model = load(base_dir, task_sketch=tmp_path / "t", values_dtype=None)  # bf16 tables
    for name, param in model.named_parameters():
        if name.endswith(".values"):
            assert param.dtype == torch.float32
            assert torch.equal(param, trained.get_parameter(name))
    assert torch.equal(logits(model), logits(trained))


def test_task_sketch_on_another_base_is_a_clear_error(tmp_path):
    model = load(sketched_base(tmp_path))
    save_task_sketch(extract_task_sketch(model), tmp_path / "t")
    other = load(sketched_base(tmp_path, seed=7, name="other"))
    with pytest.raises(SketchtuneError, match="made for base"):
        apply_task_sketch(other, load_task_sketch(tmp_path / "t"))


def test_not_a_task_sketch(tmp_path):
    with pytest.raises(SketchtuneError, match="not a task sketch"):
        load_task_sketch(tmp_path)


def test_export_writes_a_plain_transformers_model(tmp_path):
    base_dir = sketched_base(tmp_path)
    model = load(base_dir)
    nudge(model, 0.01)
    expected = logits(model)
    export_dense(model, char_tokenizer(), tmp_path / "dense", dtype=torch.float32)
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "dense").eval()
    assert not hasattr(dense.config, "quantization_config")
    torch.testing.assert_close(logits(dense), expected, atol=1e-4, rtol=1e-4)
