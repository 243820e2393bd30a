"""The command line on a tiny model: the whole compress -> generate -> eval path, and bad input."""

import json
import subprocess
import sys

import pytest

from sketchtune.cli import main


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_compress_finetune_eval_end_to_end(tmp_path, tiny_model_dir, tiny_task_file, capsys):
    out_dir = tmp_path / "sketched"
    code, out, err = run(
        capsys, "compress", tiny_model_dir, "-o", out_dir, "--bits", 4, "--gpr", 2,
        "--samples", 4, "--seq-len", 32,
    )
    assert code == 0, err
    assert json.loads(out)["sketched_layers"] == 14

    code, out, err = run(capsys, "generate", out_dir, "--prompt", "hello", "--max-new-tokens", 4)
    assert code == 0, err

    task_dir = tmp_path / "task"
    code, out, err = run(
        capsys, "finetune", out_dir, "--data", tiny_task_file, "-o", task_dir, "--max-steps", 4,
        "--batch-size", 4, "--seq-len", 256, "--lr", 1e-2, "--save-steps", 2,
    )
    assert code == 0, err
    summary = json.loads(out[out.index('{\n  "base"'):])  # after the trainer's log lines
    assert summary["steps"] == 4 and (task_dir / "loss.png").is_file()

    results = tmp_path / "ppl.json"
    perplexities = []
    for model, sketch in ((tiny_model_dir, None), (out_dir, None), (out_dir, task_dir)):
        extra = ["--task-sketch", sketch] if sketch else []
        code, out, err = run(
            capsys, "eval", model, "--task", "ppl", "--samples", 2, "--seq-len", 32,
            "--output", results, *extra,
        )
        assert code == 0, err
        saved = json.loads(results.read_text())["results"][0]
        assert saved["perplexity"] > 1 and saved["tokens"] == 2 * 31
        perplexities.append(saved["perplexity"])
    assert perplexities[2] != perplexities[1]  # the task sketch was applied


def test_compress_calibrates_on_an_instruction_file_or_a_named_task(
    tmp_path, tiny_model_dir, tiny_task_file, capsys
):
    from safetensors.torch import load_file

    folders = {}
    for name, extra in (("shipped", []), ("task", ["--calib", tiny_task_file])):
        folders[name] = tmp_path / name
        code, _, err = run(capsys, "compress", tiny_model_dir, "-o", folders[name],
                           "--samples", 2, "--seq-len", 16, *extra)
        assert code == 0, err
    shipped, task = (load_file(folders[n] / "model.safetensors") for n in ("shipped", "task"))
    assert shipped.keys() == task.keys()
    assert any(not shipped[k].equal(task[k]) for k in shipped)  # other activations, other sketch
    line = one_line_error(*run(capsys, "compress", tiny_model_dir, "-o", tmp_path / "x",
                               "--calib", "no-such-task")[::2])
    assert "unknown task 'no-such-task'" in line and not (tmp_path / "x").exists()


def one_line_error(code, err):
    assert code == 2
    # Progress bars may precede it on stderr; the error itself is one line and no traceback.
    lines = err.strip().splitlines()
    assert lines[-1].startswith("error: ") and "Traceback" not in err, err
    return lines[-1]


def test_existing_output_folder_needs_force(tmp_path, tiny_model_dir, capsys):
    out_dir = tmp_path / "exists"
    out_dir.mkdir()
    line = one_line_error(*run(capsys, "compress", tiny_model_dir, "-o", out_dir)[::2])
    assert "--force" in line


def test_folder_that_is_not_a_model(tmp_path, capsys):
    line = one_line_error(*run(capsys, "compress", tmp_path, "-o", tmp_path / "o")[::2])
    assert "not a model folder" in line
    assert not (tmp_path / "o").exists()


def test_unknown_local_model(tmp_path, capsys):
    line = one_line_error(*run(capsys, "eval", "./no-such-model")[::2])
    assert "no-such-model" in line


def test_corrupt_checkpoint(tmp_path, tiny_model_dir, capsys):
    out_dir = tmp_path / "s"
    assert run(capsys, "compress", tiny_model_dir, "-o", out_dir, "--samples", 2,
               "--seq-len", 16)[0] == 0
    (out_dir / "model.safetensors").write_bytes(b"\x00" * 100)
    line = one_line_error(*run(capsys, "eval", out_dir)[::2])
    assert "corrupt" in line


@pytest.mark.parametrize("flag,value", [("--bits", 5), ("--gpr", 3), ("--samples", 0)])
def test_out_of_range_options_exit_2(tmp_path, tiny_model_dir, flag, value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["compress", str(tiny_model_dir), "-o", str(tmp_path / "o"), flag, str(value)])
    assert exit_info.value.code == 2
    assert not (tmp_path / "o").exists()


def test_gpr_that_divides_no_projection_is_a_clear_error(tmp_path, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.conftest import char_tokenizer

    folder = tmp_path / "odd"
    config = LlamaConfig(
        vocab_size=128, hidden_size=36, intermediate_size=68, num_hidden_layers=1,
        num_attention_heads=3, num_key_value_heads=3, head_dim=12,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    argv = ("compress", folder, "-o", tmp_path / "o", "--gpr", 8, "--samples", 2, "--seq-len", 16)
    line = one_line_error(*run(capsys, *argv)[::2])
    assert "could be sketched" in line and "gpr=8" in line
    assert not (tmp_path / "o").exists()


def test_unknown_model_fails_at_once_when_the_hub_is_unreachable(monkeypatch, capsys):
    import socket

    def no_network(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    line = one_line_error(*run(capsys, "eval", "smollm2-135")[::2])
    assert "unknown model 'smollm2-135'" in line and "did you mean 'smollm2-135m'" in line


def test_help_and_argument_errors_do_not_import_the_model_stack():
    # `sketchtune --help` or a mistyped option should answer at once: transformers, datasets and
    # the trainer are imported by the commands that use them, not by the package or the parser.
    code = (
        "import sys, sketchtune.cli\n"
        "heavy = [m for m in ('transformers', 'datasets', 'peft') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_compress_writes_shards_on_the_chosen_device(tmp_path, tiny_model_dir, capsys):
    out_dir = tmp_path / "sharded"
    code, out, err = run(
        capsys, "compress", tiny_model_dir, "-o", out_dir, "--gpr", 2, "--samples", 2,
        "--seq-len", 16, "--device", "cpu", "--max-shard-size", "40KB",
    )
    assert code == 0, err
    summary = json.loads(out)
    assert summary["device"] == "cpu"
    index = json.loads((out_dir / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((out_dir / s).is_file() for s in shards)
    assert summary["bytes_on_disk"] == sum((out_dir / s).stat().st_size for s in shards)
    code, _, err = run(capsys, "generate", out_dir, "--prompt", "hi", "--max-new-tokens", 2)
    assert code == 0, err


@pytest.mark.parametrize(("flag", "value"), [("--device", "tpu"), ("--max-shard-size", "5XB"),
                                             ("--max-shard-size", "0")])
def test_bad_compress_placement_is_one_error_line(tmp_path, tiny_model_dir, capsys, flag, value):
    try:  # argparse rejects a bad type itself, by exiting with 2
        code, _, err = run(capsys, "compress", tiny_model_dir, "-o", tmp_path / "o", flag, value)
    except SystemExit as exit_:
        code, err = exit_.code, capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert len([line for line in err.splitlines() if "error:" in line]) == 1
    assert not (tmp_path / "o").exists()


def test_an_error_during_a_progress_bar_starts_its_own_line(monkeypatch, capsys):
    from tqdm.auto import tqdm

    from sketchtune import cli
    from sketchtune.errors import SketchtuneError

    def failing(_args):
        bar = tqdm(total=3, desc="work")  # updated by hand: left open by the failure
        bar.update()
        raise SketchtuneError("bad input")

    monkeypatch.setattr(cli, "cmd_demo", failing)  # build_parser binds the command by name
    assert main(["demo"]) == 2
    lines = capsys.readouterr().err.replace("\r", "\n").splitlines()
    assert "error: bad input" in lines
