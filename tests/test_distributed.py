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
                            logging_steps=1, save_steps=100, seed=5, bf16=False)
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


FSDP_SCRIPT = textwrap.dedent("""
    import os, sys
    import torch, torch.distributed as dist
    from safetensors.torch import save_file
    from torch.distributed.fsdp import fully_shard
    import sketchtune
    from transformers import AutoModelForCausalLM
    from sketchtune.compression import find_decoder_blocks

    folder, out, shard = sys.argv[1], sys.argv[2], sys.argv[3] == "fsdp"
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).train()
    batch = torch.randint(2, 97, (4, 24), generator=torch.Generator().manual_seed(0))
    rank = 0
    if shard:
        dist.init_process_group("gloo")
        rank = dist.get_rank()
        _, blocks = find_decoder_blocks(model)
        for block in blocks:  # one shard unit per decoder block, as accelerate wraps them
            fully_shard(block)
        fully_shard(model)
        batch = batch.chunk(dist.get_world_size())[rank]
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2, weight_decay=0.0)
    for _ in range(3):
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    state = {}
    for name, tensor in model.state_dict().items():
        full = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
        if name.endswith((".values", ".codes")):
            state[name] = full.detach().contiguous()
    if rank == 0:
        save_file(state, out)
""")


def test_fsdp2_shards_per_block_and_matches_one_process(sketched_tiny_dir, tmp_path):
    # transformers' Trainer runs FSDP only on accelerators; torch's FSDP2 itself runs on CPU
    # (gloo), so this checks what accelerate's FSDP2 wrapping does to a sketched model: uint8
    # codes stay unsharded buffers, values are sharded per decoder block, and training matches.
    script = tmp_path / "fsdp.py"
    script.write_text(FSDP_SCRIPT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    single, sharded = tmp_path / "single.safetensors", tmp_path / "fsdp.safetensors"
    run([sys.executable, str(script), str(sketched_tiny_dir), str(single), "single"], env)
    run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "--master_port", "29519", str(script), str(sketched_tiny_dir), str(sharded), "fsdp"], env)
    reference, result = load_file(single), load_file(sharded)
    assert set(reference) == set(result)
    for name, tensor in result.items():
        if name.endswith(".codes"):
            assert tensor.dtype == torch.uint8 and torch.equal(tensor, reference[name]), name
        else:
            torch.testing.assert_close(tensor, reference[name], rtol=1e-4, atol=1e-5)
    stored = load_file(sketched_tiny_dir / "model.safetensors")
    assert all(not torch.equal(result[n], stored[n].float()) for n in result
               if n.endswith(".values"))  # every table trained
