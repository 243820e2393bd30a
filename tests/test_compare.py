"""`sketchtune compare` end to end on a tiny model: every method trains and lands in one table."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sketchtune.cli import main
from sketchtune.data.files import find_data_root
from sketchtune.errors import SketchtuneError


def shared_data_available() -> bool:
    try:
        return (find_data_root() / "llm-adapters" / "ARC-Easy" / "test.json").is_file()
    except SketchtuneError:
        return False


@pytest.mark.skipif(not shared_data_available(), reason="needs ../shared/data")
def test_compare_tiny_model(tiny_model_dir, tiny_task_file, tmp_path, capsys):
    out, saved = tmp_path / "cmp", tmp_path / "trained"
    code = main([
        "compare", str(tiny_model_dir), "--data", str(tiny_task_file), "--task", "ARC-Easy",
        "--methods", "dense,sketch,lora,qlora", "--steps", "3", "--batch-size", "4",
        "--limit", "6", "--nll-limit", "4", "--samples", "2", "-o", str(out),
        "--save-trained", str(saved),
    ])
    assert code == 0, capsys.readouterr().err[-2000:]
    results = json.loads((out / "results.json").read_text())
    rows = {r["method"]: r for r in results["rows"]}
    assert list(rows) == ["dense", "sketch", "lora", "qlora"]
    # Matched budgets: sketch and LoRA train about the same number of parameters.
    ratio = rows["sketch"]["trainable_parameters"] / rows["lora"]["trainable_parameters"]
    assert 0.8 < ratio < 1.25
    assert rows["sketch"]["base_bytes"] < rows["lora"]["base_bytes"]
    assert rows["dense"]["trainable_parameters"] == 0
    assert rows["dense"]["base_bytes"] == rows["lora"]["base_bytes"]
    for row in rows.values():
        assert row["heldout_nll"] > 0
        assert 0 <= row["tasks"]["ARC-Easy"]["loglik"]["accuracy"] <= 1
    with (out / "results.csv").open() as handle:
        assert len(list(csv.reader(handle))) == 5
    assert (out / "comparison.png").stat().st_size > 0
    md = (out / "results.md").read_text()
    assert "held-out NLL" in md
    table = md.split("\n\n")[0].splitlines()
    assert all("[" in line.split("|")[2] for line in table[2:])  # one seed: NLL with its CI
    assert_saved_methods_reload(tiny_model_dir, saved, rows)


def assert_saved_methods_reload(tiny_model_dir, saved, rows):
    """What --save-trained kept, loaded the way users load it, scores as the row says."""
    from peft import PeftModel
    from safetensors.torch import load_file

    from sketchtune.api import load_any
    from sketchtune.baselines import qlora_style_model
    from sketchtune.evaluate.run import evaluate
    from sketchtune.task_sketch import apply_task_sketch, load_task_sketch

    def heldout_nll(model, tokenizer):
        return evaluate(model.eval(), tokenizer, "ARC-Easy", "nll", limit=4)["nll"]

    model, tokenizer = load_any(str(saved / "sketch" / "base"))
    apply_task_sketch(model, load_task_sketch(saved / "sketch" / "task-sketch"))
    # the base file keeps embeddings and norms in bf16, hence the looser tolerance
    assert heldout_nll(model, tokenizer) == pytest.approx(rows["sketch"]["heldout_nll"], rel=2e-2)

    model, tokenizer = load_any(str(tiny_model_dir))
    lora = PeftModel.from_pretrained(model, saved / "lora")
    assert heldout_nll(lora, tokenizer) == pytest.approx(rows["lora"]["heldout_nll"], rel=1e-4)

    factors = load_file(saved / "qlora" / "lora.safetensors")
    model, tokenizer = load_any(str(tiny_model_dir))
    rank = next(t for name, t in factors.items() if name.endswith("lora_a")).shape[0]
    qlora = qlora_style_model(model, rank)
    missing, unexpected = qlora.load_state_dict(factors, strict=False)
    assert not unexpected and all("lora" not in name for name in missing)
    assert heldout_nll(qlora, tokenizer) == pytest.approx(rows["qlora"]["heldout_nll"], rel=1e-4)


def test_unknown_method_is_a_clear_error(tiny_model_dir, tmp_path, capsys):
    code = main(["compare", str(tiny_model_dir), "--data", "gsm8k", "--task", "ARC-Easy",
                 "--methods", "dense,adapterX", "-o", str(tmp_path / "o")])
    assert code == 2
    assert "unknown methods ['adapterX']" in capsys.readouterr().err


def compare_args(model_dir, data, out, *extra):
    return ["compare", str(model_dir), "--data", str(data), "--task", "ARC-Easy",
            "--methods", "dense", "--limit", "4", "--nll-limit", "3", "-o", str(out), *extra]


@pytest.mark.skipif(not shared_data_available(), reason="needs ../shared/data")
def test_interrupted_compare_reuses_finished_methods(tiny_model_dir, tiny_task_file, tmp_path):
    out = tmp_path / "cmp"
    assert main(compare_args(tiny_model_dir, tiny_task_file, out)) == 0
    first = json.loads((out / "results.json").read_text())
    assert not (tmp_path / "cmp.run").exists()  # cleaned up once the table is written

    # As if a run stopped after `dense` finished: its row is kept next to the output.
    (tmp_path / "cmp.run").mkdir()
    kept = {**first["rows"][0], "marker": "from the interrupted run"}
    (tmp_path / "cmp.run" / "dense-seed42.json").write_text(
        json.dumps({"settings": first["settings"], "row": kept})
    )
    out2 = tmp_path / "cmp2"
    (tmp_path / "cmp.run").rename(tmp_path / "cmp2.run")
    with_lora = {**first["settings"], "methods": ["dense", "lora"],  # another method list
                 "lr_grid_lora": [1e-4, 3e-4, 1e-3, 3e-3]}  # and a grid extended upward
    (tmp_path / "cmp2.run" / "dense-seed42.json").write_text(json.dumps({"settings": with_lora,
                                                                  "row": kept}))
    assert main(compare_args(tiny_model_dir, tiny_task_file, out2)) == 0
    assert json.loads((out2 / "results.json").read_text())["rows"][0]["marker"]

    # Different settings: the kept row does not count.
    (tmp_path / "cmp3.run").mkdir()
    (tmp_path / "cmp3.run" / "dense-seed42.json").write_text(
        json.dumps({"settings": {**first["settings"], "seed": 7}, "row": kept})
    )
    out3 = tmp_path / "cmp3"
    assert main(compare_args(tiny_model_dir, tiny_task_file, out3)) == 0
    assert "marker" not in json.loads((out3 / "results.json").read_text())["rows"][0]


@pytest.mark.skipif(not shared_data_available(), reason="needs ../shared/data")
def test_math_tasks_are_scored_by_generation_only(tiny_model_dir, tiny_task_file, tmp_path,
                                                  capsys):
    args = compare_args(tiny_model_dir, tiny_task_file, tmp_path / "a")
    args[args.index("ARC-Easy")] = "ARC-Easy,gsm8k"
    assert main(args) == 2
    assert "give --generate-limit" in capsys.readouterr().err
    assert main([*args[:-2], "-o", str(tmp_path / "b"), "--generate-limit", "2"]) == 0
    row = json.loads((tmp_path / "b" / "results.json").read_text())["rows"][0]
    assert set(row["tasks"]["gsm8k"]) == {"generate"}
    assert set(row["tasks"]["ARC-Easy"]) == {"loglik", "generate"}
    header = (tmp_path / "b" / "results.md").read_text().splitlines()[0]
    assert "gsm8k generate acc" in header and "gsm8k loglik" not in header


@pytest.mark.skipif(not shared_data_available(), reason="needs ../shared/data")
def test_compare_extends_an_output_with_the_same_settings(tiny_model_dir, tiny_task_file,
                                                          tmp_path, capsys):
    out = tmp_path / "cmp"
    steps = ("--steps", "2", "--batch-size", "2")
    assert main(compare_args(tiny_model_dir, tiny_task_file, out, *steps)) == 0
    results = json.loads((out / "results.json").read_text())
    results["rows"][0]["marker"] = "from the first run"
    (out / "results.json").write_text(json.dumps(results))

    assert main(compare_args(tiny_model_dir, tiny_task_file, out, "--steps", "3")) == 2
    assert "--force" in capsys.readouterr().err  # other settings: replacing needs --force

    args = compare_args(tiny_model_dir, tiny_task_file, out, *steps)
    args[args.index("dense")] = "dense,dora"
    assert main(args) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["dense", "dora"]
    assert rows[0]["marker"] == "from the first run"  # not recomputed
    assert rows[1]["trainable_parameters"] > 0 and rows[1]["heldout_nll"] > 0


def _alive(pid: int) -> bool:
    try:
        return "State:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl is Linux's")
def test_a_job_process_ends_with_the_comparison_that_started_it():
    # The parent starts a child as compare starts a job, reports its pid, and is then stopped.
    script = (
        "import subprocess, sys, time\n"
        "from sketchtune.compare import die_with_parent\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'],"
        " preexec_fn=die_with_parent)\n"
        "print(child.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    try:
        assert _alive(child)
        parent.send_signal(signal.SIGTERM)
        parent.wait(timeout=10)
        deadline = time.monotonic() + 10
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(child)
    finally:
        if _alive(child):
            os.kill(child, signal.SIGKILL)
