"""Data-parallel fine-tuning: 2 CPU processes (gloo) against one process, same global batch."""

import json
import os
import subprocess
import sys
import textwrap

import torch
from safetensors.torch import load_file

SCRIPT = textwrap.dedent("""
    import os, sys
    import torch
    from safetensors.torch import save_file
    from transformers import TrainerCallback
    from sketchtune.train import FinetuneConfig, finetune

    class DumpValues(TrainerCallback):  # every rank writes what it ends with
        def on_train_end(self, args, state, control, model=None, **kwargs):
            rank = int(os.environ.get("RANK", 0))
            values = {n: p.detach().clone() for n, p in model.named_parameters()
                      if n.endswith(".values")}
            save_file(values, os.path.join(sys.argv[3] + f".rank{rank}.safetensors"))

    base, data, out, batch = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    config = FinetuneConfig(max_steps=4, lr=1e-2, batch_size=batch, seq_len=256, warmup=0,
                            logging_steps=1, save_steps=100, seed=5)
    finetune(base, data, out, config, progress=False, callbacks=[DumpValues()])
""")


def run(args, env):
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def losses(folder):
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    return [json.loads(x)["loss"] for x in lines if "loss" in json.loads(x)]


def test_two_process_ddp_matches_one_process(sketched_tiny_dir, tiny_task_file, tmp_path):
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    run([sys.executable, str(script), str(sketched_tiny_dir), str(tiny_task_file), str(single),
         "4"], env)
    run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "--master_port", "29517", str(script), str(sketched_tiny_dir), str(tiny_task_file),
         str(ddp), "2"], env)

    rank0 = load_file(f"{ddp}.rank0.safetensors")
    rank1 = load_file(f"{ddp}.rank1.safetensors")
    reference = load_file(f"{single}.rank0.safetensors")
    for name, tensor in rank0.items():
        assert torch.equal(tensor, rank1[name]), name  # DDP keeps replicas identical
        torch.testing.assert_close(tensor, reference[name], rtol=1e-4, atol=1e-5)
    for a, b in zip(losses(ddp), losses(single), strict=True):
        assert abs(a - b) < 1e-4 * max(1.0, abs(b))
