"""Bad input, from a table of mutations: folders, configs, tensors, task sketches, options, data
files and output locations. Every case must end the CLI with exit 2, exactly one `error:` line on
stderr, no traceback, and the work folder byte for byte as it was: nothing left at the
destination, the existing output (`out/`, `out.json`) untouched."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from sketchtune.cli import main
from tests.conftest import char_tokenizer, tiny_model

Mutation = Callable[[Path], list]  # builds its inputs in the work folder, returns the argv


# The pristine work folder, built once: a sketched tiny model, its dense source, a task sketch,
# a data file, an existing output folder and results file, and a plain file.


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    from sketchtune.compression import SketchConfig, compress_model
    from sketchtune.hub import load, save_sketched
    from sketchtune.task_sketch import extract_task_sketch, save_task_sketch

    root = tmp_path_factory.mktemp("pristine")
    tiny_model().save_pretrained(root / "dense")
    char_tokenizer().save_pretrained(root / "dense")
    model = tiny_model()
    calibration = torch.randint(2, 97, (4, 32), generator=torch.Generator().manual_seed(1))
    compress_model(model, calibration, SketchConfig(bits=4, gpr=2), progress=False)
    save_sketched(model, char_tokenizer(), root / "sk")
    save_task_sketch(extract_task_sketch(load(root / "sk")), root / "ts")
    rows = [{"instruction": f"add {a} and {b}", "output": f"{a + b}"} for a in range(4)
            for b in range(4)]
    (root / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (root / "out").mkdir()
    (root / "out" / "keep.txt").write_text("the previous output\n")
    (root / "out.json").write_text('{"previous": true}\n')
    (root / "afile").write_text("a plain file\n")
    return root


@pytest.fixture
def work(pristine, tmp_path) -> Path:
    shutil.copytree(pristine, tmp_path / "w")
    return tmp_path / "w"


def snapshot(folder: Path) -> dict[str, str]:
    """Every path under `folder` with a hash of its bytes ('dir' for folders)."""
    def digest(p: Path) -> str:
        return "dir" if p.is_dir() else hashlib.sha1(p.read_bytes()).hexdigest()

    return {str(p.relative_to(folder)): digest(p) for p in sorted(folder.rglob("*"))}


def assert_refused(argv: list, work: Path, capsys) -> str:
    """Run the CLI in process; assert the contract; return the error line."""
    before = snapshot(work)
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse
        code = exc.code
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert code == 2, err
    assert len(errors) == 1, err
    assert "Traceback" not in err, err
    assert snapshot(work) == before, "the work folder changed"
    return errors[0]


# Mutation helpers


def edit_json(file: str, change: Callable[[object], object]) -> Callable[[Path], None]:
    def apply(w: Path) -> None:
        path = w / file
        path.write_text(json.dumps(change(json.loads(path.read_text()))))
    return apply


def write(file: str, content: bytes | str) -> Callable[[Path], None]:
    def apply(w: Path) -> None:
        data = content.encode() if isinstance(content, str) else content
        (w / file).write_bytes(data)
    return apply


def remove(*files: str) -> Callable[[Path], None]:
    def apply(w: Path) -> None:
        for file in files:
            target = w / file
            shutil.rmtree(target) if target.is_dir() else target.unlink()
    return apply


def edit_tensors(file: str, change: Callable[[dict], None]) -> Callable[[Path], None]:
    def apply(w: Path) -> None:
        tensors = load_file(w / file)
        change(tensors)
        save_file(tensors, w / file, metadata={"format": "pt"})
    return apply


def quant(change: Callable[[dict], object]) -> Callable[[Path], None]:
    def edit(config: dict) -> dict:
        config["quantization_config"] = change(dict(config["quantization_config"]))
        return config
    return edit_json("sk/config.json", edit)


def set_key(key: str, value: object) -> Callable[[dict], dict]:
    return lambda d: {**d, key: value}


def drop_key(key: str) -> Callable[[dict], dict]:
    return lambda d: {k: v for k, v in d.items() if k != key}


def swap(command: Mutation, old: str, new: Callable[[Path], object]) -> Mutation:
    """`command` with its argument `work/old` replaced by `new(work)`."""
    return lambda w: [new(w) if a == w / old else a for a in command(w)]


def without(command: Mutation, flag: str) -> Mutation:
    return lambda w: [a for a in command(w) if a != flag]


def case(name: str, mutate: Callable[[Path], None] | None, command: Mutation):
    def build(w: Path) -> list:
        if mutate is not None:
            mutate(w)
        return command(w)
    return pytest.param(build, id=name)


# Commands: each replaces an existing output, so "untouched" is checked every time


def export(w: Path) -> list:
    return ["export", w / "sk", "-o", w / "out", "--force"]


def export_sketch(w: Path) -> list:
    return ["export", w / "sk", "--task-sketch", w / "ts", "-o", w / "out", "--force"]


def finetune(*extra) -> Mutation:
    return lambda w: ["finetune", w / "sk", "--data", w / "data.jsonl", "-o", w / "out",
                      "--force", "--max-steps", 1, "--seq-len", 256, *extra]


def compress(*extra) -> Mutation:
    return lambda w: ["compress", w / "dense", "-o", w / "out", "--force", "--samples", 2,
                      "--seq-len", 16, *extra]


def evaluate(*extra) -> Mutation:
    return lambda w: ["eval", w / "sk", "--task", "ppl", "--samples", 1, "--seq-len", 16,
                      "--output", w / "out.json", *extra]


# The table

DEEP = "[" * 100_000
QUANT = {"bits": 4, "groups_per_row": 2, "modules": ["model.layers.0.self_attn.q_proj"],
         "fingerprint": "0" * 32, "storage_dtype": "bfloat16", "dense_projections": [],
         "learning": {}, "format_version": 2, "packing": "lsb-first", "quant_method": "sketchtune"}
WRONG_TYPE = {int: ["4", 4.5, None, [4]], str: [5, ["x"]], list: ["x", None, [1]],
              dict: ["x", [1]]}
REQUIRED_QUANT = ("bits", "groups_per_row", "modules", "quant_method")
LAYER = "model.layers.0.self_attn.q_proj"
TENSORS = [f"model.layers.0.{p}.{kind}" for p in ("self_attn.q_proj", "mlp.down_proj")
           for kind in ("codes", "values")] + ["model.embed_tokens.weight", "model.norm.weight",
                                              "model.layers.0.input_layernorm.weight"]


def folder_cases() -> list:
    config = "sk/config.json"
    return [
        case("config-missing", remove(config), export),
        case("config-garbage", write(config, "{not json"), export),
        case("config-list", write(config, "[]"), export),
        case("config-not-utf8", write(config, b"\xff\xfe{"), export),
        case("config-deep", write(config, DEEP), export),
        case("weights-missing", remove("sk/model.safetensors"), export),
        case("weights-garbage", write("sk/model.safetensors", b"\x00" * 64), export),
        case("weights-empty", write("sk/model.safetensors", b""), export),
        case("weights-truncated", lambda w: (w / "sk/model.safetensors").write_bytes(
            (w / "sk/model.safetensors").read_bytes()[:5000]), export),
        case("index-garbage", write("sk/model.safetensors.index.json", "{"), export),
        case("index-list", write("sk/model.safetensors.index.json", "[]"), export),
        case("tokenizer-missing", remove("sk/tokenizer.json", "sk/tokenizer_config.json"), export),
        case("tokenizer-garbage", write("sk/tokenizer.json", "garbage{"), export),
        case("tokenizer-config-list", write("sk/tokenizer_config.json", "[1]"), export),
        case("tokenizer-missing-finetune", remove("sk/tokenizer.json", "sk/tokenizer_config.json"),
             finetune()),
        case("auto-map-unknown-type", edit_json(config, lambda c: {
            **c, "model_type": "xmodel", "auto_map": {"AutoModelForCausalLM": "m.XForCausalLM"}}),
            export),
        case("auto-map-unknown-type-finetune", edit_json(config, lambda c: {
            **c, "model_type": "xmodel", "auto_map": {"AutoConfig": "c.XConfig"}}), finetune()),
        case("model-type-unknown", edit_json(config, set_key("model_type", "xmodel")), export),
        case("model-type-missing", edit_json(config, drop_key("model_type")), export),
        case("model-type-number", edit_json(config, set_key("model_type", 5)), export),
        case("hidden-size-wrong", edit_json(config, set_key("hidden_size", 32)), export),
        case("layers-more", edit_json(config, set_key("num_hidden_layers", 3)), export),
        case("vocab-string", edit_json(config, set_key("vocab_size", "x")), export),
        case("model-is-a-file", None, lambda w: ["export", w / "afile", "-o", w / "out",
                                                 "--force"]),
        case("dense-source-deep-config", write("dense/config.json", DEEP), compress()),
        case("dense-source-no-tokenizer", remove("dense/tokenizer.json"), compress()),
    ]


def quant_cases() -> list:
    cases = [case(f"quant-{key}-removed", quant(drop_key(key)), export) for key in REQUIRED_QUANT]
    for key, example in QUANT.items():
        for i, value in enumerate(WRONG_TYPE[type(example)]):
            cases.append(case(f"quant-{key}-retyped-{i}", quant(set_key(key, value)), export))
    values = [("bits", 3), ("bits", 0), ("bits", 2), ("groups_per_row", 3),
              ("groups_per_row", -1), ("groups_per_row", 4), ("modules", []),
              ("modules", ["model.norm"]), ("modules", ["model.layers.0.self_attn"]),
              ("modules", ["model.nope"]), ("modules", ["model.layers.0.self_attn.q_proj"] * 2),
              ("fingerprint", "0" * 32), ("storage_dtype", None), ("packing", None),
              ("storage_dtype", "garbage"), ("format_version", 99), ("packing", "msb-first"),
              ("quant_method", "gptq"), ("unknown_key", 1)]
    cases += [case(f"quant-{key}={value}", quant(set_key(key, value)), export)
              for key, value in values]
    cases += [case(f"quant-is-{type(v).__name__}", quant(lambda _, v=v: v), export)
              for v in ([], "sketchtune", 4)]
    return cases


def tensor_cases() -> list:
    file = "sk/model.safetensors"

    def retype(name: str, dtype: torch.dtype):
        def change(t: dict) -> None:
            t[name] = t[name].to(dtype)
        return change

    def reshape(name: str, shape: Callable[[torch.Tensor], torch.Tensor]):
        def change(t: dict) -> None:
            t[name] = shape(t[name]).contiguous()
        return change

    cases = []
    for name in TENSORS:
        short = name.removeprefix("model.")
        dtypes = (torch.int8, torch.int32) if name.endswith("codes") else (torch.int32,
                                                                           torch.float64)
        cases += [case(f"{short}-as-{str(d).removeprefix('torch.')}",
                       edit_tensors(file, retype(name, d)), export) for d in dtypes]
        cases += [
            case(f"{short}-one-row-less", edit_tensors(file, reshape(name, lambda t: t[:-1])),
                 export),
            case(f"{short}-extra-dim", edit_tensors(file, reshape(name, lambda t: t[None])),
                 export),
        ]
        cases.append(case(f"{short}-missing", edit_tensors(file, lambda t, n=name: t.pop(n)),
                          export))

    def fill(name: str, value: float):
        def change(t: dict) -> None:
            t[name] = torch.full_like(t[name], value)
        return change

    cases += [
        case("values-nan", edit_tensors(file, fill(f"{LAYER}.values", float("nan"))), export),
        case("values-inf", edit_tensors(file, fill(f"{LAYER}.values", float("inf"))), export),
        case("unexpected-tensor", edit_tensors(
            file, lambda t: t.__setitem__("model.extra.weight", torch.zeros(2))), export),
    ]
    return cases


def task_sketch_cases() -> list:
    meta, values = "ts/task_sketch.json", "ts/values.safetensors"

    def table(change: Callable[[torch.Tensor], torch.Tensor]):
        def apply(t: dict) -> None:
            t[LAYER] = change(t[LAYER]).contiguous()
        return apply

    cases = [
        case("sketch-meta-missing", remove(meta), export_sketch),
        case("sketch-meta-list", write(meta, "[1, 2]"), export_sketch),
        case("sketch-meta-not-utf8", write(meta, b"\xff\xfe{"), export_sketch),
        case("sketch-meta-deep", write(meta, DEEP), export_sketch),
        case("sketch-meta-garbage", write(meta, "{"), export_sketch),
        case("sketch-values-missing", remove(values), export_sketch),
        case("sketch-values-garbage", write(values, b"\x01" * 32), export_sketch),
        case("sketch-on-dense-model", None, lambda w: [
            "export", w / "dense", "--task-sketch", w / "ts", "-o", w / "out", "--force"]),
        case("sketch-is-a-model", None, lambda w: [
            "export", w / "sk", "--task-sketch", w / "sk", "-o", w / "out", "--force"]),
    ]
    for key in ("base_fingerprint", "bits", "groups_per_row"):
        cases.append(case(f"sketch-{key}-removed", edit_json(meta, drop_key(key)), export_sketch))
    retyped = [("bits", "4"), ("bits", 4.0), ("groups_per_row", None), ("base_fingerprint", 5),
               ("layers", "x"), ("format_version", 99), ("bits", 2), ("groups_per_row", 4),
               ("base_fingerprint", "0" * 32), ("layers", [LAYER])]
    cases += [case(f"sketch-{key}={value!r}", edit_json(meta, set_key(key, value)), export_sketch)
              for key, value in retyped]
    shapes = {"rows-1-16": lambda t: t[:, :1], "rows-2-8": lambda t: t[:, :, :8],
              "half-rows": lambda t: t[: t.shape[0] // 2], "rows-4-16": lambda t: t.repeat(1, 2, 1),
              "flat": lambda t: t.flatten()}
    cases += [case(f"sketch-table-{name}", edit_tensors(values, table(shape)), export_sketch)
              for name, shape in shapes.items()]
    fills = {"f16": lambda t: t.half(), "int32": lambda t: t.int(), "f64": lambda t: t.double(),
             "nan": lambda t: torch.full_like(t, float("nan")),
             "inf": lambda t: torch.full_like(t, float("-inf"))}
    cases += [case(f"sketch-table-{name}", edit_tensors(values, table(fill)), export_sketch)
              for name, fill in fills.items()]
    cases += [
        case("sketch-layer-missing", edit_tensors(values, lambda t: t.pop(LAYER)), export_sketch),
        case("sketch-layer-extra", edit_tensors(
            values, lambda t: t.__setitem__("model.extra", torch.zeros(4, 2, 16))), export_sketch),
    ]
    return cases


def option_cases() -> list:
    bad = {
        finetune: [("--lr", v) for v in (0, -1, "nan", "inf", "abc")]
        + [("--epochs", v) for v in (0, -1, "nan", "inf")]
        + [("--warmup", -5), ("--max-steps", 0), ("--max-steps", -2), ("--batch-size", 0),
           ("--batch-size", -1), ("--grad-accum", 0), ("--seq-len", 0), ("--seq-len", 1),
           ("--save-steps", 0), ("--limit", 0)],
        compress: [("--samples", 0), ("--samples", -1), ("--seq-len", 0), ("--damp", 0),
                   ("--damp", -1), ("--damp", "nan"), ("--damp", "inf"), ("--damp", 1),
                   ("--bits", 5), ("--gpr", 3), ("--max-shard-size", 0),
                   ("--max-shard-size", -5), ("--max-shard-size", "nan"),
                   ("--max-shard-size", "5XB"), ("--device", "toaster"), ("--kmeans", "x")],
        evaluate: [("--limit", 0), ("--batch-size", 0), ("--num-beams", 0), ("--samples", 0),
                   ("--seq-len", 0), ("--seq-len", -1), ("--max-new-tokens", 0),
                   ("--task", "nope"), ("--protocol", "x")],
    }
    cases = [case(f"{make.__name__}{flag}={value}", None, make(flag, value))
             for make, pairs in bad.items() for flag, value in pairs]
    generate = [("--max-new-tokens", 0), ("--max-new-tokens", -1)]
    cases += [case(f"generate{flag}={value}", None, lambda w, f=flag, v=value: [
        "generate", w / "sk", "--prompt", "hi", f, v]) for flag, value in generate]
    return cases


def data_cases() -> list:
    files = {"deep.json": DEEP, "deep.jsonl": DEEP + "\n", "not-utf8.jsonl": b"\xff\xfe\n",
             "object.json": '{"a": 1}', "numbers.json": "[1, 2, 3]", "empty.jsonl": "",
             "garbage.jsonl": "{nope\n[\n", "data.txt": "hello\n"}
    cases = [case(f"finetune-data-{name}", write(name, content),
                  swap(finetune(), "data.jsonl", lambda w, n=name: w / n))
             for name, content in files.items()]
    cases += [
        case("finetune-data-missing", None, swap(finetune(), "data.jsonl", lambda w: w / "no")),
        case("finetune-data-folder", None, swap(finetune(), "data.jsonl", lambda w: w / "out")),
    ]
    calib = {"deep.json": DEEP, "not-utf8.txt": b"\xff\xfe", "empty.txt": "",
             "object.json": '{"text": "x"}', "no-text.jsonl": '{"a": 1}\n', "deep.jsonl": DEEP}
    cases += [case(f"compress-calib-{name}", write(name, content),
                   lambda w, n=name: compress("--calib", w / n)(w))
              for name, content in calib.items()]
    cases.append(case("compress-calib-missing", None,
                      lambda w: compress("--calib", w / "nope.txt")(w)))
    cases += [case(f"eval-text-{name}", write(name, content),
                   lambda w, n=name: evaluate("--text", w / n)(w))
              for name, content in {"deep.json": DEEP, "empty.txt": ""}.items()]
    return cases


def output_cases() -> list:
    def convert(w: Path) -> list:
        return ["convert", w / "afile", "--base", w / "dense", "-o", w / "out", "--force"]

    writers = {"compress": compress(), "finetune": finetune(), "export": export,
               "convert": convert}
    cases = [case(f"{name}-output-under-a-file", None,
                  swap(command, "out", lambda w: w / "afile" / "x" / "y"))
             for name, command in writers.items()]
    cases += [case(f"{name}-output-is-a-file", None, swap(command, "out", lambda w: w / "afile"))
              for name, command in writers.items()]
    cases += [case(f"{name}-existing-output-without-force", None, without(command, "--force"))
              for name, command in writers.items()]
    cases += [
        case("eval-output-under-a-file", None,
             swap(evaluate(), "out.json", lambda w: w / "afile" / "r.json")),
        case("eval-output-is-a-folder", None, swap(evaluate(), "out.json", lambda w: w / "out")),
    ]
    return cases


TABLE = (folder_cases() + quant_cases() + tensor_cases() + task_sketch_cases() + option_cases()
         + data_cases() + output_cases())


@pytest.mark.parametrize("mutation", TABLE)
def test_bad_input_is_one_error_line(mutation: Mutation, work: Path, capsys) -> None:
    argv = mutation(work)
    assert_refused(argv, work, capsys)


def test_the_table_covers_every_family() -> None:
    assert len(TABLE) >= 200


# Output locations that need the system's help: a read-only folder, a full disk


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
@pytest.mark.parametrize("command", [compress(), finetune(), export, evaluate()],
                         ids=["compress", "finetune", "export", "eval"])
def test_read_only_destination(command: Mutation, work: Path, capsys) -> None:
    (work / "ro").mkdir()
    argv = swap(swap(command, "out", lambda w: w / "ro" / "x"), "out.json",
                lambda w: w / "ro" / "r.json")(work)
    os.chmod(work / "ro", 0o555)
    try:
        assert "not writable" in assert_refused(argv, work, capsys)
    finally:
        os.chmod(work / "ro", 0o755)


def disk_full(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("target, command, says", [
    ("sketchtune.hub.save_file", compress("--plain"), "previous output is unchanged"),
    ("transformers.modeling_utils.safe_save_file", export, "previous output is unchanged"),
    ("sketchtune.task_sketch.save_file", finetune(), "run's files"),  # its first checkpoint
], ids=["compress", "export", "finetune"])
def test_disk_full_while_writing(target: str, command: Mutation, says: str, work: Path, capsys,
                                 monkeypatch) -> None:
    monkeypatch.setattr(target, disk_full)
    line = assert_refused(command(work), work, capsys)
    assert "No space left on device" in line and says in line


def test_disk_full_while_writing_results(work: Path, capsys, monkeypatch) -> None:
    original = Path.write_text

    def write_text(self: Path, *args, **kwargs):
        if ".tmp-" in self.name:
            disk_full()
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", write_text)
    line = assert_refused(evaluate()(work), work, capsys)
    assert "No space left on device" in line


def test_optional_quantization_keys_may_be_absent(work: Path, capsys) -> None:
    """The keys a reader defaults are not required: their absence still loads."""
    for key in sorted(set(QUANT) - set(REQUIRED_QUANT)):
        quant(drop_key(key))(work)
        assert main([str(a) for a in export(work)]) == 0, capsys.readouterr().err


def test_float16_tensors_load_as_their_numbers(work: Path, capsys) -> None:
    """Another float dtype than the stored bf16 is read as the numbers it holds, never
    reinterpreted: the export is the same model."""
    assert main(["export", str(work / "sk"), "-o", str(work / "bf16"), "--force"]) == 0
    edit_tensors("sk/model.safetensors", lambda t: t.update(
        {k: v.half() for k, v in t.items() if v.is_floating_point()}))(work)
    assert main(["export", str(work / "sk"), "-o", str(work / "f16")]) == 0, capsys.readouterr()
    expected, got = load_file(work / "bf16/model.safetensors"), load_file(
        work / "f16/model.safetensors")
    assert expected.keys() == got.keys()
    for key in expected:  # bf16 -> f16 is exact but for f16's subnormals (|x| < 6e-5)
        torch.testing.assert_close(got[key], expected[key], atol=1e-4, rtol=0)
