"""Fine-tuning on a tiny sketched model: values-only training, resume after a kill, NaN stop."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

import sketchtune.train as train
from sketchtune import checkpointing
from sketchtune.cli import main
from sketchtune.errors import SketchtuneError
from sketchtune.hub import load
from sketchtune.task_sketch import load_task_sketch
from sketchtune.train import COMPLETE_MARKER, FinetuneConfig, finetune, resolve_defaults

FAST = dict(batch_size=4, seq_len=256, save_steps=2, logging_steps=1, warmup=0, seed=3)


def test_only_values_train_and_outputs_are_written(sketched_tiny_dir, tiny_task_file, tmp_path):
    out = tmp_path / "task"
    summary = finetune(
        sketched_tiny_dir, str(tiny_task_file), out,
        FinetuneConfig(max_steps=8, lr=3e-2, **FAST), progress=False,
    )
    base = load(sketched_tiny_dir)
    expected = sum(p.numel() for n, p in base.named_parameters() if n.endswith(".values"))
    assert summary["trainable_parameters"] == expected
    assert summary["steps"] == 8
    assert {p.name for p in out.iterdir()} == {
        "values.safetensors", "task_sketch.json", "metrics.jsonl", "loss.png"
    }
    assert not out.with_name("task.run").exists()

    # Values moved, everything else (codes, norms, embeddings) is the base's.
    tuned_values = load_task_sketch(out).values
    base_state = base.state_dict()
    moved = [n for n, v in tuned_values.items() if not torch.equal(v, base_state[n + ".values"])]
    assert moved == sorted(tuned_values)

    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert losses[-1] < losses[0]


def test_unfinished_run_needs_resume_or_force(sketched_tiny_dir, tiny_task_file, tmp_path):
    done = tmp_path / "task.run" / "checkpoints" / "checkpoint-2"
    done.mkdir(parents=True)
    (done / COMPLETE_MARKER).touch()
    with pytest.raises(SketchtuneError, match="holds an unfinished run: pass --resume"):
        finetune(sketched_tiny_dir, str(tiny_task_file), tmp_path / "task",
                 FinetuneConfig(max_steps=2, **FAST), progress=False)


def test_run_folder_without_a_good_checkpoint_is_replaced(sketched_tiny_dir, tiny_task_file,
                                                          tmp_path):
    (tmp_path / "task.run" / "checkpoints" / "checkpoint-2").mkdir(parents=True)  # no marker
    with pytest.raises(SketchtuneError, match="nothing to resume.*without --resume"):
        finetune(sketched_tiny_dir, str(tiny_task_file), tmp_path / "task",
                 FinetuneConfig(max_steps=2, **FAST), resume=True, progress=False)
    finetune(sketched_tiny_dir, str(tiny_task_file), tmp_path / "task",
             FinetuneConfig(max_steps=2, **FAST), progress=False)
    assert (tmp_path / "task" / "values.safetensors").is_file()


KILLED_RUN = textwrap.dedent("""
    import os, signal, sys
    from transformers import TrainerCallback
    from sketchtune.train import FinetuneConfig, finetune

    class KillAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 5:  # after checkpoint-4 was written, before the next one
                os.kill(os.getpid(), signal.SIGKILL)

    base, data, out = sys.argv[1:4]
    config = FinetuneConfig(max_steps=8, lr=3e-2, batch_size=4, seq_len=256, save_steps=2,
                            logging_steps=1, warmup=0, seed=3)
    finetune(base, data, out, config, progress=False, callbacks=[KillAt()])
""")


def test_resume_after_kill_equals_an_uninterrupted_run(sketched_tiny_dir, tiny_task_file,
                                                       tmp_path):
    config = FinetuneConfig(max_steps=8, lr=3e-2, **FAST)
    finetune(sketched_tiny_dir, str(tiny_task_file), tmp_path / "straight", config,
             progress=False)

    killed = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run(
        [sys.executable, "-c", KILLED_RUN, str(sketched_tiny_dir), str(tiny_task_file),
         str(killed)],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert not killed.exists() and (tmp_path / "killed.run").exists()

    finetune(sketched_tiny_dir, str(tiny_task_file), killed, config, resume=True,
             progress=False)
    straight = load_file(tmp_path / "straight" / "values.safetensors")
    resumed = load_file(killed / "values.safetensors")
    for name, tensor in straight.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=0, atol=1e-6)


class BreakValuesAt(TrainerCallback):
    """Simulates a diverging run: one table turns to NaN after step `at`."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.at:
            with torch.no_grad():
                next(p for n, p in model.named_parameters() if n.endswith(".values")).fill_(
                    float("nan")
                )


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(
    sketched_tiny_dir, tiny_task_file, tmp_path
):
    with pytest.raises(SketchtuneError, match="loss became nan at step 4.*checkpoint-2.*--lr"):
        finetune(sketched_tiny_dir, str(tiny_task_file), tmp_path / "task",
                 FinetuneConfig(max_steps=8, lr=1e-3, **FAST), progress=False,
                 callbacks=[BreakValuesAt(3)])
    assert not (tmp_path / "task").exists()
    kept = tmp_path / "task.run" / "checkpoints" / "checkpoint-2"
    assert torch.isfinite(load_task_sketch(kept).values[next(iter(
        load_task_sketch(kept).values))]).all()


def test_gradient_checkpointing_gives_the_same_values(sketched_tiny_dir, tiny_task_file, tmp_path):
    runs = {}
    for mode in checkpointing.MODES:
        out = tmp_path / f"gc-{mode}"
        config = FinetuneConfig(max_steps=2, lr=1e-2, gradient_checkpointing=mode, **FAST)
        finetune(sketched_tiny_dir, str(tiny_task_file), out, config, progress=False)
        runs[mode] = load_file(out / "values.safetensors")
        records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        assert any("tokens_per_second" in r for r in records)
        settings = load_task_sketch(out).info["training"]["settings"]
        assert settings["gradient_checkpointing"] == mode
    for other in ("selective", "full"):
        for name, tensor in runs["off"].items():
            torch.testing.assert_close(runs[other][name], tensor, rtol=1e-5, atol=1e-6)


def test_a_checkpoint_with_non_finite_values_is_never_written(sketched_tiny_dir, tiny_task_file,
                                                              tmp_path):
    with pytest.raises(SketchtuneError, match="loss became nan at step 3.*no good checkpoint"):
        finetune(sketched_tiny_dir, str(tiny_task_file), tmp_path / "task",
                 FinetuneConfig(max_steps=8, lr=1e-3, **FAST), progress=False,
                 callbacks=[BreakValuesAt(2)])  # broken before checkpoint-2 is saved
    assert not (tmp_path / "task.run").exists()  # nothing good to resume: nothing kept


def finetune_cli(capsys, *argv):
    code = main(["finetune", *map(str, argv)])
    err = capsys.readouterr().err
    return code, [line for line in err.splitlines() if line.startswith("error: ")] or [err]


def test_a_diverging_run_keeps_no_checkpoint_and_can_be_rerun(sketched_tiny_dir, tiny_task_file,
                                                               tmp_path, capsys):
    """--lr 1e37: step 1's loss is finite but its update makes the values ~1e37; checkpoint-1 is
    written, then removed when step 2's loss is not finite (it was never good to resume)."""
    argv = [sketched_tiny_dir, "--data", tiny_task_file, "-o", tmp_path / "task", "--lr", 1e37,
            "--save-steps", 1, "--max-steps", 4, "--batch-size", 4, "--seq-len", 256]
    for _ in range(2):  # the same command again meets the same error, not a stale run folder
        code, err = finetune_cli(capsys, *argv)
        assert code == 2 and "loss became" in err[0] and "no good checkpoint" in err[0], err
        assert not (tmp_path / "task.run").exists() and not (tmp_path / "task").exists()


def test_a_failure_before_training_leaves_nothing_behind(sketched_tiny_dir, tmp_path):
    too_long = tmp_path / "long.jsonl"  # every example over --seq-len: none usable
    too_long.write_text(json.dumps({"instruction": "x" * 400, "output": "y"}) + "\n")
    for _ in range(2):
        with pytest.raises(SketchtuneError, match="no usable training example"):
            finetune(sketched_tiny_dir, str(too_long), tmp_path / "task",
                     FinetuneConfig(max_steps=2, **FAST), progress=False)
        assert not (tmp_path / "task.run").exists()


@pytest.mark.parametrize("setting, value, message", [
    ("lr", float("nan"), "--lr must be a positive number, not nan"),
    ("lr", float("inf"), "--lr must be a positive number"),
    ("lr", 0.0, "--lr must be a positive number"),
    ("lr", -1e-4, "--lr must be a positive number"),
    ("epochs", 0.0, "--epochs must be a positive number, not 0"),
    ("epochs", -1.0, "--epochs must be a positive number"),
    ("epochs", float("nan"), "--epochs must be a positive number"),
    ("warmup", -1, "--warmup must be 0 or more steps, not -1"),
    ("max_steps", 0, r"--max-steps must be positive \(or -1: run --epochs\), not 0"),
    ("max_steps", -2, "--max-steps must be positive"),
    ("save_steps", 0, "--save-steps must be positive"),
])
def test_config_rejects_bad_values(setting, value, message):
    with pytest.raises(SketchtuneError, match=message):
        FinetuneConfig(**{setting: value})


@pytest.mark.parametrize("option, value", [("--lr", "nan"), ("--epochs", "0"),
                                           ("--max-steps", "0"), ("--warmup", "-3")])
def test_cli_rejects_bad_values_before_loading_anything(option, value, tmp_path, capsys):
    code, err = finetune_cli(capsys, tmp_path / "no-model", "--data", "x.jsonl", "-o",
                             tmp_path / "out", option, value)
    assert code == 2 and err[0].startswith(f"error: {option} must be"), err
    assert not (tmp_path / "out.run").exists()


def test_checkpointing_and_bf16_defaults(sketched_tiny_dir, monkeypatch):
    model = load(sketched_tiny_dir)
    resolved = resolve_defaults(FinetuneConfig(), model)
    assert resolved.gradient_checkpointing == "selective"  # far below the threshold
    assert resolved.bf16 is train.native_bf16()
    monkeypatch.setattr(checkpointing, "FULL_ABOVE", 1000)
    assert resolve_defaults(FinetuneConfig(), model).gradient_checkpointing == "full"
    explicit = resolve_defaults(FinetuneConfig(gradient_checkpointing="off", bf16=False), model)
    assert (explicit.gradient_checkpointing, explicit.bf16) == ("off", False)
