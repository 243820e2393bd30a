"""Loading a sketched folder through each door: transformers' `from_pretrained` (sketchtune's
quantizer), `sketchtune.load` (a thin wrapper over it), and a minimal direct loader (meta skeleton,
SketchLinear shells, one `load_state_dict(assign=True)` from the safetensors file) as the floor.

Each path runs in a process of its own, in turns, `--repeats` times; the script prints the median
load time, the peak RSS above what the imports alone reach, and whether the logits on a fixed
prompt are bit-identical across paths. Writes benchmarks/results/load_paths.json.

    .venv/bin/python benchmarks/load_paths.py /tmp/smol-sketch
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from machine import cpu_model

CHILD = r"""
import sys, time, json, torch
from sketchtune.memory import peak_rss_bytes
import sketchtune
from transformers import AutoModelForCausalLM
from sketchtune.hf_quantizer import install_shells
from sketchtune.hub import sketch_config_of, read_safetensors, checkpoint_files
from accelerate import init_empty_weights
from transformers import AutoConfig

path, folder, out = sys.argv[1], sys.argv[2], sys.argv[3]
sketchtune.load  # its module's imports (datasets, ...) are not part of loading
before = peak_rss_bytes()
start = time.perf_counter()
if path == "from_pretrained":
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
elif path == "sketchtune.load":
    model = sketchtune.load(folder, values_dtype=None)
else:  # direct: the floor any loader pays (read the file, assign the tensors)
    config = AutoConfig.from_pretrained(folder)
    del config.quantization_config
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    install_shells(model, sketch_config_of(folder), torch.bfloat16)
    state = {}
    for file in checkpoint_files(folder):
        state.update(read_safetensors(file))
    state = {k: v.float() if v.is_floating_point() and not k.endswith(".values") else v
             for k, v in state.items()}
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    model.eval()
seconds = time.perf_counter() - start
peak = peak_rss_bytes() - before
prompt = torch.arange(2, 66).reshape(1, 64)
with torch.no_grad():
    logits = model(prompt).logits
torch.save(logits, out + ".pt")
json.dump({"seconds": seconds, "peak_above_imports_mib": peak / 2**20}, open(out, "w"))
"""

PATHS = ("from_pretrained", "sketchtune.load", "direct")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="a sketched model folder")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", default="benchmarks/results/load_paths.json")
    args = parser.parse_args()
    cpu = cpu_model()
    print(f"CPU: {cpu}; torch {torch.__version__}; {torch.get_num_threads()} threads")
    runs: dict[str, list[dict]] = {p: [] for p in PATHS}
    logits: dict[str, torch.Tensor] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for path in PATHS:  # in turns, so a busy spell hits every path alike
                out = f"{tmp}/{path}-{repeat}.json"
                subprocess.run([sys.executable, "-c", CHILD, path, args.folder, out], check=True,
                               stderr=subprocess.DEVNULL)
                runs[path].append(json.loads(Path(out).read_text()))
                logits[path] = torch.load(out + ".pt")
    summary = {}
    for path in PATHS:
        seconds = statistics.median(r["seconds"] for r in runs[path])
        peak = statistics.median(r["peak_above_imports_mib"] for r in runs[path])
        same = bool(torch.equal(logits[path], logits["sketchtune.load"]))
        summary[path] = {"median_seconds": round(seconds, 3), "median_peak_mib": round(peak, 1),
                         "logits_equal_to_sketchtune_load": same}
        print(f"{path:>16}: {seconds:6.2f} s, peak {peak:7.1f} MiB above the imports, "
              f"logits identical to sketchtune.load: {same}")
    hf, floor = summary["from_pretrained"], summary["direct"]
    ratio_time = hf["median_seconds"] / floor["median_seconds"]
    ratio_peak = hf["median_peak_mib"] / floor["median_peak_mib"]
    print(f"from_pretrained / direct: time {ratio_time:.2f}x, peak {ratio_peak:.2f}x")
    result = {"command": " ".join(["benchmarks/load_paths.py", *sys.argv[1:]]), "cpu": cpu,
              "folder": args.folder, "repeats": args.repeats, "paths": summary,
              "from_pretrained_over_direct": {"time": round(ratio_time, 3),
                                              "peak": round(ratio_peak, 3)}}
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
