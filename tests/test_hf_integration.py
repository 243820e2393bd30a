"""Sketched folders through transformers' own doors: from_pretrained, save_pretrained, pipeline,
Trainer and TRL, named task sketches, and the checks that keep a wrong folder from loading."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments, pipeline

import sketchtune
from sketchtune.compression import SketchConfig, compress_model
from sketchtune.errors import SketchtuneError
from sketchtune.hub import INDEX_NAME, WEIGHTS_NAME, load, save_sketched
from sketchtune.layers import SketchLinear, sketched_layers
from sketchtune.task_sketch import extract_task_sketch, save_task_sketch
from tests.conftest import char_tokenizer, tiny_model

CALIB = torch.randint(2, 97, (4, 32), generator=torch.Generator().manual_seed(1))
PROMPT = torch.randint(2, 97, (2, 12), generator=torch.Generator().manual_seed(2))


def logits(model):
    with torch.no_grad():
        return model(PROMPT).logits


@pytest.fixture(scope="module")
def sketched(tmp_path_factory):
    """A sketched tiny Llama in memory and as a folder (4 bits, gpr 2)."""
    model = tiny_model()
    compress_model(model, CALIB, SketchConfig(bits=4, gpr=2), progress=False)
    folder = tmp_path_factory.mktemp("hf") / "sketched"
    save_sketched(model, char_tokenizer(), folder)
    return model, folder


def test_from_pretrained_returns_the_sketched_model(sketched):
    _, folder = sketched
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    layers = sketched_layers(model)
    assert len(layers) == 2 * 7 and all(type(m) is SketchLinear for m in layers.values())
    stored = load_file(folder / WEIGHTS_NAME)
    for name, layer in layers.items():  # codes and values exactly as stored
        assert torch.equal(layer.codes, stored[f"{name}.codes"])
        assert torch.equal(layer.values, stored[f"{name}.values"])
    assert torch.equal(logits(model), logits(load(folder, values_dtype=None)))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.values" for n in layers}


def test_import_sketchtune_alone_registers_the_quantizer(sketched):
    _, folder = sketched
    script = (
        "import sketchtune, sys\n"
        "assert 'transformers' not in sys.modules\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(folder)!r})\n"
        "print(type(m.model.layers[0].mlp.down_proj).__name__)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "SketchLinear"


def test_save_pretrained_round_trips_through_both_loaders(sketched, tmp_path):
    _, folder = sketched
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():  # a trained-looking model: fp32 tables off the bf16 grid
        for layer in sketched_layers(model).values():
            layer.values.data = layer.values.data.float() + 1e-3
    expected = logits(model)
    model.save_pretrained(tmp_path / "out")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    assert torch.equal(logits(again), expected)
    assert torch.equal(logits(load(tmp_path / "out", values_dtype=None)), expected)


def test_sharded_folders_load_shard_by_shard(sketched, tmp_path):
    model, folder = sketched
    save_sketched(model, char_tokenizer(), tmp_path / "sharded", max_shard_size=20_000)
    files = sorted(p.name for p in (tmp_path / "sharded").iterdir())
    assert INDEX_NAME in files and WEIGHTS_NAME not in files
    assert sum(f.startswith("model-") for f in files) > 1
    assert torch.equal(logits(load(tmp_path / "sharded")), logits(load(folder)))


def test_pipeline_generates(sketched):
    _, folder = sketched
    generator = pipeline("text-generation", model=str(folder))
    assert isinstance(generator.model.model.layers[0].self_attn.q_proj, SketchLinear)
    out = generator("hello", max_new_tokens=6, do_sample=False)
    assert out[0]["generated_text"].startswith("hello") and len(out[0]["generated_text"]) > 5


def tiny_dataset(tokenizer, n=8):
    rows = [tokenizer(f"add {i} and {i} gives {2 * i}")["input_ids"] for i in range(n)]
    return [{"input_ids": r, "labels": r} for r in rows]


def test_trainer_trains_fp32_values_of_a_model_loaded_the_default_way(sketched, tmp_path):
    _, folder = sketched
    model = AutoModelForCausalLM.from_pretrained(folder)
    before = {n: m.values.detach().float().clone() for n, m in sketched_layers(model).items()}
    assert next(iter(sketched_layers(model).values())).values.dtype == torch.bfloat16
    args = TrainingArguments(
        tmp_path / "run", max_steps=2, per_device_train_batch_size=1, learning_rate=1e-2,
        report_to=[], save_strategy="no", use_cpu=True, logging_steps=1,
    )
    Trainer(model=model, args=args, train_dataset=tiny_dataset(char_tokenizer())).train()
    for name, layer in sketched_layers(model).items():
        assert layer.values.dtype == torch.float32  # fp32 masters from the first training step
        assert not torch.equal(layer.values.detach(), before[name])


def test_trl_sft_trainer_trains_the_values(sketched, tmp_path):
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    _, folder = sketched
    model = AutoModelForCausalLM.from_pretrained(folder)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    before = {n: m.values.detach().float().clone() for n, m in sketched_layers(model).items()}
    data = Dataset.from_list([{"text": f"add {i} and {i} gives {2 * i}"} for i in range(8)])
    config = trl.SFTConfig(
        output_dir=str(tmp_path / "sft"), max_steps=2, per_device_train_batch_size=2,
        learning_rate=1e-2, report_to=[], save_strategy="no", use_cpu=True, max_length=32,
    )
    tokenizer = char_tokenizer()
    tokenizer.pad_token = tokenizer.eos_token
    trl.SFTTrainer(model=model, args=config, train_dataset=data,
                   processing_class=tokenizer).train()
    for name, layer in sketched_layers(model).items():
        assert not torch.equal(layer.values.detach(), before[name])
    for name, param in model.named_parameters():
        if name in frozen:
            assert torch.equal(param, frozen[name]), name


def test_named_task_sketches_switch_like_fresh_loads(sketched, tmp_path):
    _, folder = sketched
    model = load(folder)
    for name, shift in (("a", 0.01), ("b", -0.02)):
        tuned = load(folder)
        with torch.no_grad():
            for layer in sketched_layers(tuned).values():
                layer.values.add_(shift)
        save_task_sketch(extract_task_sketch(tuned), tmp_path / name)
    base_logits = logits(model)
    assert model.load_task_sketch(tmp_path / "a") == "a"
    model.load_task_sketch(tmp_path / "b", name="task-b")
    assert sorted(model.task_sketches) == ["a", "task-b"]
    assert torch.equal(logits(model), base_logits)  # loading is not applying
    model.set_task_sketch("a")
    assert torch.equal(logits(model), logits(sketchtune.load(folder, task_sketch=tmp_path / "a")))
    model.set_task_sketch("task-b")
    assert torch.equal(logits(model), logits(sketchtune.load(folder, task_sketch=tmp_path / "b")))
    model.set_task_sketch(None)
    assert torch.equal(logits(model), base_logits) and model.active_task_sketch is None
    with pytest.raises(SketchtuneError, match="no task sketch named 'c'"):
        model.set_task_sketch("c")


def test_a_task_sketch_for_another_base_is_refused(sketched, tmp_path):
    _, folder = sketched
    other = tiny_model(seed=3)
    compress_model(other, CALIB, SketchConfig(bits=4, gpr=2), progress=False)
    save_sketched(other, None, tmp_path / "other")
    save_task_sketch(extract_task_sketch(load(tmp_path / "other")), tmp_path / "t")
    with pytest.raises(SketchtuneError, match="was made for base"):
        load(folder).load_task_sketch(tmp_path / "t")


def copy_folder(folder, target):
    import shutil

    shutil.copytree(folder, target)
    return target


def edit_config(folder, edit):
    config = json.loads((folder / "config.json").read_text())
    edit(config["quantization_config"])
    (folder / "config.json").write_text(json.dumps(config))


def edit_tensors(folder, edit):
    tensors = load_file(folder / WEIGHTS_NAME)
    edit(tensors)
    save_file(tensors, folder / WEIGHTS_NAME, metadata={"format": "pt"})


FIRST = "model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda f: edit_config(f, lambda q: q.update(format_version=99)), "version 99"),
        (lambda f: edit_config(f, lambda q: q.update(packing="msb-first")), "packing"),
        (lambda f: edit_config(f, lambda q: q.pop("modules")), "lacks"),
        (lambda f: edit_config(f, lambda q: q.update(bits="4")), "integer"),
        (lambda f: edit_config(f, lambda q: q["modules"].append("model.norm")), "not a Linear"),
        (lambda f: edit_config(f, lambda q: q.update(fingerprint="0" * 32)), "fingerprint"),
        (lambda f: edit_tensors(f, lambda t: t.pop(f"{FIRST}.values")), "missing"),
        (lambda f: edit_tensors(f, lambda t: t.update({f"{FIRST}.codes": t[f"{FIRST}.codes"]
                                                      .view(torch.int8)})), "U8"),
        (lambda f: edit_tensors(f, lambda t: t[f"{FIRST}.values"].view(-1)[0].fill_(
            float("nan"))), "non-finite"),
        (lambda f: edit_tensors(f, lambda t: t.update({f"{FIRST}.values": t[f"{FIRST}.values"]
                                                      [:, :1].contiguous()})), "shape"),
    ],
)
def test_a_wrong_folder_fails_loudly_through_every_loader(sketched, tmp_path, mutate, message):
    _, folder = sketched
    broken = copy_folder(folder, tmp_path / "broken")
    mutate(broken)
    with pytest.raises(SketchtuneError, match=message):
        load(broken)
    with pytest.raises(SketchtuneError, match=message):
        AutoModelForCausalLM.from_pretrained(broken)


def test_folders_without_a_format_version_load_as_version_1(sketched, tmp_path):
    _, folder = sketched
    old = copy_folder(folder, tmp_path / "v1")

    def strip(quant):
        for key in ("format_version", "packing", "dense_projections"):
            quant.pop(key)

    edit_config(old, strip)
    assert torch.equal(logits(load(old)), logits(load(folder)))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m.update(format_version=7), "format version 7"),
        (lambda m: m.update(bits="4"), "damaged"),
        (lambda m: m.pop("base_fingerprint"), "damaged"),
    ],
)
def test_task_sketch_metadata_is_checked(sketched, tmp_path, edit, message):
    _, folder = sketched
    save_task_sketch(extract_task_sketch(load(folder)), tmp_path / "t")
    meta_file = tmp_path / "t" / "task_sketch.json"
    meta = json.loads(meta_file.read_text())
    assert meta["format_version"] == 2
    edit(meta)
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(SketchtuneError, match=message):
        load(folder).load_task_sketch(tmp_path / "t")


@pytest.mark.parametrize("groups_and_codes", [(1, 16), (4, 16), (2, 8)])
def test_task_sketch_tables_of_another_shape_are_refused(sketched, tmp_path, groups_and_codes):
    _, folder = sketched  # a gpr-2, 4-bit base: its tables are (rows, 2, 16)
    sketch = extract_task_sketch(load(folder))
    rows = sketch.values[FIRST].shape[0]
    sketch.values[FIRST] = torch.zeros(rows, *groups_and_codes)
    save_task_sketch(sketch, tmp_path / "t")
    with pytest.raises(SketchtuneError, match="shape"):
        sketchtune.load(folder, task_sketch=tmp_path / "t")


def test_the_python_api_loads_the_fast_inference_path_by_default(sketched):
    _, folder = sketched
    model = sketchtune.load(folder)
    layer = next(iter(sketched_layers(model).values()))
    assert layer.values.dtype == torch.bfloat16  # tables as stored
    assert model.get_input_embeddings().weight.dtype == torch.bfloat16
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        with torch.no_grad():
            model.generate(PROMPT[:1], max_new_tokens=3, do_sample=False, pad_token_id=1)
    ran = {event.key for event in prof.key_averages()}
    assert {"sketchtune::lut_linear", "sketchtune::bf16_linear"} <= ran  # the C++ GEMVs
    assert logits(model).dtype == torch.float32


def test_a_trainer_step_on_the_default_load_trains_fp32_values(sketched, tmp_path):
    _, folder = sketched
    model = sketchtune.load(folder)
    reference = sketchtune.load(folder, values_dtype=torch.float32, serve=False)
    batch = torch.tensor(tiny_dataset(char_tokenizer(), 1)[0]["input_ids"])[None]
    for m in (model, reference):  # the same loss and table gradients as the plain fp32 model
        m.train()
        m(input_ids=batch, labels=batch).loss.backward()
    for (name, a), b in zip(sketched_layers(model).items(), sketched_layers(reference).values(),
                            strict=True):
        assert a.values.dtype == torch.float32
        torch.testing.assert_close(a.values.grad, b.values.grad, rtol=1e-4, atol=1e-6), name
    args = TrainingArguments(
        tmp_path / "run", max_steps=1, per_device_train_batch_size=1, learning_rate=1e-2,
        report_to=[], save_strategy="no", use_cpu=True,
    )
    model.zero_grad()
    Trainer(model=model, args=args, train_dataset=tiny_dataset(char_tokenizer())).train()
    assert all(layer.values.dtype == torch.float32 for layer in sketched_layers(model).values())
