"""`sketchtune compare`: every method on the same data, steps, seed and evaluation, side by side.

Methods: the dense model untuned, SketchTune (chosen gpr), LoRA and DoRA through PEFT at the
sketch's trainable-parameter count, and a QLoRA-style 4-bit base + LoRA (our plain-PyTorch NF4
base, see baselines.py). Each method runs in its own process, so its peak memory is its own.
The table leads with the held-out loss (mean NLL per response token on the test split of the
training task), which separates methods at small scale where accuracies sit at chance.
PEFT adapters (LoRA, DoRA) are merged into the base before evaluation: the same function, and
DoRA unmerged recomputes every weight's column norms on each forward (several times slower).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .atomic import atomic_directory
from .cliargs import option, positive_int
from .data.registry import MIX, loglik_tasks, task_names
from .errors import SketchtuneError
from .format import SUPPORTED_BITS, SUPPORTED_GPR
from .memory import peak_rss_bytes, storage_bytes

METHODS = ("dense", "sketch", "lora", "dora", "qlora")


@dataclass
class CompareConfig:
    model: str = option(help="dense source model: hub id, local folder or embedded name",
                        positional=True)
    data: str = option(help="training data (as for finetune)")
    tasks: list[str] = option(help=f"evaluation tasks, comma-separated: {task_names()}, or files",
                              flag="task")
    methods: list[str] = option(help="comma-separated", factory=lambda: list(METHODS))
    gpr: int = option(4, "groups per row of the sketch", choices=SUPPORTED_GPR)
    bits: int = option(4, "bits per code of the sketch", choices=SUPPORTED_BITS)
    steps: int = option(100, "training steps per method", type=positive_int)
    batch_size: int = option(8, "sequences per step", type=positive_int)
    seq_len: int = option(256, "longest training sequence in tokens", type=positive_int)
    lr_sketch: float = option(1e-4, "learning rate of the sketch values")
    lr_lora: float = option(2e-4, "learning rate of the LoRA-family methods")
    seed: int = option(42, "random seed")
    limit: int | None = option(400, "log-likelihood items per task", type=positive_int)
    nll_limit: int = option(200, "held-out responses for the NLL", type=positive_int)
    generate_limit: int = option(0, "generation items per task (slow on CPU); 0 skips it")
    calib_samples: int = option(32, "calibration sequences", flag="samples", type=positive_int)
    calib_seq_len: int = option(512, "tokens per calibration sequence", type=positive_int)
    sketched: str | None = option(
        None, "reuse this compressed base instead of compressing (must match --bits/--gpr)"
    )
    heldout: str | None = option(None, "task for the held-out NLL (default: the --data task)")
    data_root: str | None = option(None, "folder with the shared data (default ../shared/data)")
    save_trained: str | None = option(  # where, not how: not a setting of the rows
        None, "keep each trained method in DIR/<method> (task sketch, PEFT adapter, ...)",
        metavar="DIR",
    )

    def __post_init__(self) -> None:
        unknown = sorted(set(self.methods) - set(METHODS))
        if unknown:
            raise SketchtuneError(f"unknown methods {unknown} (available: {', '.join(METHODS)})")
        answer_tasks = sorted(set(self.tasks) - set(loglik_tasks(self.tasks)))
        if answer_tasks and not self.generate_limit:
            raise SketchtuneError(
                f"{', '.join(answer_tasks)} have no answer options to score by log-likelihood: "
                "give --generate-limit N to score generated answers"
            )


def frozen_bytes(model: torch.nn.Module) -> int:
    """Bytes of the base held in memory: every frozen parameter and buffer, each storage once."""
    tensors = [*model.parameters(), *model.buffers()]
    return storage_bytes(t for t in tensors if not t.requires_grad)


def _build(method: str, cfg: CompareConfig):
    """(model ready to train or evaluate, tokenizer, learning rate) for one method."""
    from .api import compress
    from .baselines import lora_model, matched_lora_rank, qlora_style_model
    from .compression import SketchConfig
    from .sources import load_dense
    from .train import freeze_all_but_values

    if method == "sketch" and cfg.sketched:
        from .api import load_any

        model, tokenizer = load_any(cfg.sketched)
        freeze_all_but_values(model)
        return model, tokenizer, cfg.lr_sketch
    model, tokenizer = load_dense(cfg.model)
    if method == "dense":  # untuned: nothing trains, all of it is base
        model.requires_grad_(False)
        return model, tokenizer, 0.0
    if method == "sketch":
        compress(model, tokenizer, SketchConfig(bits=cfg.bits, gpr=cfg.gpr),
                 samples=cfg.calib_samples, seq_len=cfg.calib_seq_len)
        freeze_all_but_values(model)
        return model, tokenizer, cfg.lr_sketch
    rank = matched_lora_rank(model, cfg.gpr, cfg.bits)
    if method == "qlora":
        return qlora_style_model(model, rank), tokenizer, cfg.lr_lora
    return lora_model(model, rank, dora=method == "dora"), tokenizer, cfg.lr_lora


def heldout_task(cfg: CompareConfig) -> str:
    """The training task's own test split, unless it has none (a mix or a user file)."""
    if cfg.heldout:
        return cfg.heldout
    if cfg.data == MIX or Path(cfg.data).suffix in (".json", ".jsonl"):
        return cfg.tasks[0]
    return cfg.data


def _evaluate_all(model, tokenizer, cfg: CompareConfig) -> dict:
    from .evaluate.run import evaluate

    heldout = evaluate(model, tokenizer, heldout_task(cfg), "nll", limit=cfg.nll_limit,
                       data_root=cfg.data_root)
    scores = {"heldout_nll": heldout["nll"], "heldout": heldout, "tasks": {}}
    for task in cfg.tasks:
        scores["tasks"][task] = {}
        if task in loglik_tasks(cfg.tasks):
            scores["tasks"][task]["loglik"] = evaluate(
                model, tokenizer, task, "loglik", limit=cfg.limit, data_root=cfg.data_root
            )
        if cfg.generate_limit:
            scores["tasks"][task]["generate"] = evaluate(
                model, tokenizer, task, "generate", limit=cfg.generate_limit,
                data_root=cfg.data_root,
            )
    return scores


def run_method(method: str, cfg: CompareConfig) -> dict:
    """Build, train (unless dense) and evaluate one method in this process."""
    from .train import FinetuneConfig, LeanLossTrainer, SketchTrainer, prepare_data, train_model

    torch.manual_seed(cfg.seed)
    model, tokenizer, lr = _build(method, cfg)
    row = {
        "method": method,
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "base_bytes": frozen_bytes(model),
    }
    if method != "dense":
        train_cfg = FinetuneConfig(max_steps=cfg.steps, lr=lr, batch_size=cfg.batch_size,
                                   seq_len=cfg.seq_len, seed=cfg.seed, save_steps=cfg.steps + 1,
                                   logging_steps=max(1, cfg.steps // 20))
        dataset, report = prepare_data(cfg.data, tokenizer, train_cfg, cfg.data_root)
        with tempfile.TemporaryDirectory() as run_dir:
            trainer, result, seconds = train_model(
                model, tokenizer, dataset, train_cfg, Path(run_dir),
                trainer_cls=SketchTrainer if method == "sketch" else LeanLossTrainer,
            )
            metrics = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text()
                       .splitlines()]
        if cfg.save_trained:
            save_trained(model, tokenizer, method, cfg, Path(cfg.save_trained) / method)
        row.update(
            train_loss=result.training_loss,
            train_seconds=seconds,
            train_tokens_per_second=int(trainer.state.num_input_tokens_seen) / seconds,
            loss_curve=[(m["step"], m["loss"]) for m in metrics if "loss" in m],
            test_overlap=report["test_overlap"],
        )
    if method in ("lora", "dora"):
        model = model.merge_and_unload()
    model.eval()
    row.update(_evaluate_all(model, tokenizer, cfg))
    row["peak_rss_bytes"] = peak_rss_bytes()
    return row


def compare(cfg: CompareConfig, output: str | Path, force: bool = False) -> dict:
    """Run every method in its own process and write the comparison tables and chart."""
    from .atomic import check_output_dir, write_json_atomic
    from .report import write_comparison

    settings = asdict(cfg)
    earlier = _earlier_rows(Path(output), settings)
    # An output with the same settings is extended (its rows reused), anything else replaced.
    check_output_dir(output, force or bool(earlier))
    # Finished methods are kept here, so an interrupted comparison reruns only what is missing.
    done_dir = Path(f"{output}.run")
    done_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for method in cfg.methods:
        done = done_dir / f"{method}.json"
        saved = json.loads(done.read_text()) if done.is_file() else None
        if saved is not None and _same_run(saved["settings"], settings):
            print(f"== {method}: finished in an earlier run, reused from {done}", flush=True)
            rows.append(saved["row"])
            continue
        if method in earlier:
            print(f"== {method}: reused from {output}/results.json (same settings)", flush=True)
            rows.append(earlier[method])
            continue
        print(f"== {method}", flush=True)
        proc = subprocess.run(
            [sys.executable, "-m", "sketchtune.compare", json.dumps({"method": method,
                                                                     **settings})],
            stdout=subprocess.PIPE, text=True,
        )
        if proc.returncode != 0:
            raise SketchtuneError(f"method {method} failed (exit {proc.returncode}); see above")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        write_json_atomic(done, {"settings": settings, "row": rows[-1]})
    results = {"settings": settings, "rows": rows}
    with atomic_directory(output, force=True) as temp:
        write_comparison(results, temp)
    shutil.rmtree(done_dir)
    return results


def _earlier_rows(output: Path, settings: dict) -> dict[str, dict]:
    """Rows of a finished comparison in `output` run with these settings, by method."""
    try:
        results = json.loads((output / "results.json").read_text())
        if _same_run(results["settings"], settings):
            return {row["method"]: row for row in results["rows"]}
    except (OSError, ValueError, KeyError, TypeError):
        pass  # no earlier comparison there, or not one of ours
    return {}


def save_trained(model, tokenizer, method: str, cfg: CompareConfig, folder: Path) -> None:
    """Keep what a method trained, in the form its users load: a task sketch (plus the
    compressed base when compare made it), a PEFT adapter, or the QLoRA-style LoRA factors."""
    from safetensors.torch import save_file

    from .hub import save_sketched
    from .task_sketch import extract_task_sketch, write_task_sketch

    with atomic_directory(folder, force=True) as temp:
        if method == "sketch":
            if not cfg.sketched:  # the base was compressed in this run: keep it too
                save_sketched(model, tokenizer, temp / "base")
            base = cfg.sketched or str(folder / "base")
            (temp / "task-sketch").mkdir()
            write_task_sketch(extract_task_sketch(model, {"base": base}), temp / "task-sketch")
        elif method in ("lora", "dora"):
            model.save_pretrained(temp)
        else:  # qlora: our own layers, so a plain file of the trained factors by name
            trained = {name: p.detach().contiguous() for name, p in model.named_parameters()
                       if p.requires_grad}
            save_file(trained, temp / "lora.safetensors", metadata={"rank": str(
                next(iter(trained.values())).shape[0])})


_NOT_SETTINGS = ("methods", "save_trained")  # neither changes any method's row


def _same_run(a: dict, b: dict) -> bool:
    """Whether a kept row answers these settings: all must match but those that leave a method's
    row as it is (the list of methods: a row does not depend on which others run beside it)."""
    def settings(d: dict) -> dict:
        return {k: v for k, v in d.items() if k not in _NOT_SETTINGS}

    return settings(a) == settings(b)


def _worker() -> None:
    spec = json.loads(sys.argv[1])
    method = spec.pop("method")
    print(json.dumps(run_method(method, CompareConfig(**spec))))


if __name__ == "__main__":
    _worker()
