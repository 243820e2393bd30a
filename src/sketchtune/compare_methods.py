"""What each `compare --methods` row is: its model built, trained and scored, in one process.

Methods: the dense model untuned, SketchTune (chosen gpr), LoRA and DoRA through PEFT at the
sketch's trainable-parameter count, and a QLoRA-style 4-bit base + LoRA (our plain-PyTorch NF4
base, see baselines.py), and LoftQ (that base and LoRA, started by LoftQ's alternating NF4 / SVD).
`sketch-gprN` is SketchTune at another gpr (LoRA ranks stay matched to `gpr`). A sketch starts
from its one compression, made once per gpr and kept in the run folder `compare` passes as
`cache`. PEFT adapters (LoRA, DoRA) are merged into the base before evaluation: the same
function, and DoRA unmerged recomputes every weight's column norms on each forward (several
times slower). Rows keep every test item's outcome, for the paired tests in the tables.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .atomic import atomic_directory
from .data.registry import MIX, loglik_tasks
from .errors import SketchtuneError
from .format import SUPPORTED_GPR
from .memory import peak_rss_bytes, storage_bytes

if TYPE_CHECKING:
    from .compare import CompareConfig

METHODS = ("dense", "sketch", "lora", "dora", "qlora", "loftq",
           *(f"sketch-gpr{g}" for g in SUPPORTED_GPR))
VAL_SEED = 0  # the validation split is the same whatever the run's seed


def frozen_bytes(model: torch.nn.Module) -> int:
    """Bytes of the base held in memory: every frozen parameter and buffer, each storage once."""
    tensors = [*model.parameters(), *model.buffers()]
    return storage_bytes(t for t in tensors if not t.requires_grad)


def sketch_gpr(method: str, cfg: CompareConfig) -> int | None:
    """The gpr of a sketch method ("sketch": --gpr, "sketch-gprN": N), None for the others."""
    if method == "sketch":
        return cfg.gpr
    return int(method.removeprefix("sketch-gpr")) if method.startswith("sketch-gpr") else None


def default_lr(method: str, cfg: CompareConfig) -> float:
    return cfg.lr_sketch if sketch_gpr(method, cfg) else cfg.lr_lora


def lr_grid(method: str, cfg: CompareConfig) -> list[float]:
    return cfg.lr_grid_sketch if sketch_gpr(method, cfg) else cfg.lr_grid_lora


def _build(method: str, cfg: CompareConfig, cache: Path | None):
    """(model ready to train or evaluate, tokenizer) for one method."""
    from .baselines import lora_model, matched_lora_rank, qlora_style_model
    from .sources import load_dense

    gpr = sketch_gpr(method, cfg)
    if gpr is not None:
        return _sketched_base(cfg, gpr, cache)
    model, tokenizer = load_dense(cfg.model)
    if method == "dense":  # untuned: nothing trains, all of it is base
        model.requires_grad_(False)
        return model, tokenizer
    rank = matched_lora_rank(model, cfg.gpr, cfg.bits)
    if method in ("qlora", "loftq"):
        iterations = cfg.loftq_iterations if method == "loftq" else 0
        return qlora_style_model(model, rank, iterations), tokenizer
    return lora_model(model, rank, dora=method == "dora"), tokenizer


def _sketched_base(cfg: CompareConfig, gpr: int, cache: Path | None):
    """The sketched model, values trainable: --sketched, or compressed here; with a `cache`
    folder compressed once per gpr and read back by every later run (all seeds, all rates)."""
    from .api import compress, load_any
    from .compression import SketchConfig
    from .hub import save_sketched
    from .sources import load_dense
    from .train import freeze_all_but_values

    folder = Path(cfg.sketched) if cfg.sketched and gpr == cfg.gpr else None
    if folder is None:
        model, tokenizer = load_dense(cfg.model)
        folder = cache / _base_name(cfg, gpr) if cache else None
        if folder is None or not folder.is_dir():
            compress(model, tokenizer, SketchConfig(bits=cfg.bits, gpr=gpr),
                     sketch_calibration(cfg), cfg.calib_samples, cfg.calib_seq_len)
            if folder is None:
                freeze_all_but_values(model)
                return model, tokenizer
            save_sketched(model, tokenizer, folder)  # atomic: there only once complete
    # exactly as stored, values in fp32 for training (serving's bf16 head is for inference)
    model, tokenizer = load_any(str(folder), values_dtype=torch.float32, serve=False)
    freeze_all_but_values(model)
    return model, tokenizer


def sketch_calibration(cfg: CompareConfig) -> list[str] | None:
    """The texts the sketch is calibrated on: `--calib`, where it names the training data the
    examples trained on (so no validation item is calibrated on); None: the shipped text."""
    from .data.tasks import calibration_source, example_texts

    if cfg.calib is None:
        return None
    if cfg.calib == cfg.data:
        return example_texts(split_training(cfg)[0])
    return calibration_source(cfg.calib, cfg.data_root)


def _base_name(cfg: CompareConfig, gpr: int) -> str:
    """The cached base's folder, named by everything its compression depends on."""
    made = {"model": cfg.model, "bits": cfg.bits, "gpr": gpr, "samples": cfg.calib_samples,
            "seq_len": cfg.calib_seq_len}
    if cfg.calib is not None:  # the shipped text leaves the names of earlier bases as they were
        made["calib"] = cfg.calib
    digest = hashlib.sha256(json.dumps(made, sort_keys=True).encode()).hexdigest()[:12]
    return f"base-gpr{gpr}-{digest}"


def split_training(cfg: CompareConfig) -> tuple[list, list]:
    """(training examples, validation examples): with --lr-grid, `val_items` training examples
    drawn with a fixed seed are held out of training for every method and seed."""
    from .data.tasks import load_examples

    examples, _ = load_examples(cfg.data, "train", cfg.data_root)
    if not cfg.lr_grid:
        return examples, []
    if cfg.val_items >= len(examples):
        raise SketchtuneError(
            f"--val-items {cfg.val_items} leaves nothing to train on ({len(examples)} examples)"
        )
    held = set(random.Random(VAL_SEED).sample(range(len(examples)), cfg.val_items))
    return ([e for i, e in enumerate(examples) if i not in held],
            [e for i, e in enumerate(examples) if i in held])


def _training_set(cfg: CompareConfig, tokenizer, examples: list):
    """Tokenized training examples and what the row reports about them."""
    from .data.overlap import test_overlap
    from .data.tokens import tokenize_examples

    try:
        overlap = test_overlap(examples, cfg.data_root)
    except SketchtuneError as exc:  # no shared test sets here: nothing to be contaminated with
        overlap = {"not checked": str(exc)}
    dataset, _ = tokenize_examples(examples, tokenizer, cfg.seq_len)
    if len(dataset) == 0:
        raise SketchtuneError(f"no usable training example in {cfg.data!r}")
    return dataset, overlap


def heldout_tasks(cfg: CompareConfig) -> list[str]:
    """The training task's own test split, unless it has none (a mix or a user file)."""
    if cfg.heldout:
        return cfg.heldout.split(",")
    if cfg.data == MIX or Path(cfg.data).suffix in (".json", ".jsonl"):
        return cfg.tasks[:1]
    return [cfg.data]


def _heldout(model, tokenizer, cfg: CompareConfig) -> dict:
    """The held-out NLL of every heldout task's gold responses, items pooled over the tasks."""
    from .evaluate.run import evaluate

    results = {t: evaluate(model, tokenizer, t, "nll", limit=cfg.nll_limit, per_item=True,
                           data_root=cfg.data_root) for t in heldout_tasks(cfg)}
    if len(results) == 1:
        return next(iter(results.values()))
    losses = [x for r in results.values() for x in r["per_item"]["loss"]]
    tokens = [x for r in results.values() for x in r["per_item"]["tokens"]]
    return {"nll": sum(losses) / sum(tokens), "n": len(losses), "tokens": sum(tokens),
            "per_item": {"loss": losses, "tokens": tokens},
            "tasks": {t: {k: v for k, v in r.items() if k != "per_item"}
                      for t, r in results.items()}}


def _evaluate_all(model, tokenizer, cfg: CompareConfig) -> dict:
    from .evaluate.run import evaluate

    heldout = _heldout(model, tokenizer, cfg)
    scores = {"heldout_nll": heldout["nll"], "heldout": heldout, "tasks": {}}
    for task in cfg.tasks:
        scores["tasks"][task] = {}
        if task in loglik_tasks(cfg.tasks):
            scores["tasks"][task]["loglik"] = evaluate(
                model, tokenizer, task, "loglik", limit=cfg.limit, data_root=cfg.data_root,
                per_item=True,
            )
        if cfg.generate_limit:
            scores["tasks"][task]["generate"] = evaluate(
                model, tokenizer, task, "generate", limit=cfg.generate_limit,
                data_root=cfg.data_root, per_item=True,
            )
    return scores


def run_method(method: str, cfg: CompareConfig, seed: int | None = None,
               lr: float | None = None, tune: bool = False, cache: str | None = None) -> dict:
    """Build, train (unless dense) and evaluate one method in this process. `tune`: a short
    run (`lr_grid_steps`) scored by the validation NLL only."""
    from .train import FinetuneConfig, LeanLossTrainer, SketchTrainer, train_model

    seed = cfg.seed if seed is None else seed
    lr = default_lr(method, cfg) if lr is None else lr
    torch.manual_seed(seed)
    model, tokenizer = _build(method, cfg, Path(cache) if cache else None)
    row = {
        "method": method,
        "seed": seed,
        "lr": 0.0 if method == "dense" else lr,
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "base_bytes": frozen_bytes(model),
    }
    if method in ("qlora", "loftq") and not tune:
        from .baselines import block_linears, init_errors
        from .sources import load_dense

        dense = {n: m.weight.detach() for n, m in block_linears(load_dense(cfg.model)[0]).items()}
        row["init_error"] = init_errors(dense, model)
    if method != "dense":
        train, val = split_training(cfg)
        steps = cfg.lr_grid_steps if tune else cfg.steps
        train_cfg = FinetuneConfig(max_steps=steps, lr=lr, batch_size=cfg.batch_size,
                                   seq_len=cfg.seq_len, seed=seed, save_steps=steps + 1,
                                   logging_steps=max(1, steps // 20))
        dataset, overlap = _training_set(cfg, tokenizer, train)
        with tempfile.TemporaryDirectory() as run_dir:
            try:
                trainer, result, seconds = train_model(
                    model, tokenizer, dataset, train_cfg, Path(run_dir),
                    trainer_cls=SketchTrainer if sketch_gpr(method, cfg) else LeanLossTrainer,
                )
            except SketchtuneError:
                if not tune:
                    raise
                return {**row, "val_nll": None}  # diverged at this rate: never chosen
            metrics = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text()
                       .splitlines()]
        if cfg.save_trained:
            save_trained(model, tokenizer, method, cfg, Path(cfg.save_trained) / method)
        row.update(
            train_loss=result.training_loss,
            train_seconds=seconds,
            train_tokens_per_second=int(trainer.state.num_input_tokens_seen) / seconds,
            loss_curve=[(m["step"], m["loss"]) for m in metrics if "loss" in m],
            test_overlap=overlap,
        )
    if method in ("lora", "dora"):
        model = model.merge_and_unload()
    model.eval()
    if tune:
        from .evaluate.loglik import response_nll

        nll = response_nll(model, tokenizer, val, progress=False)["nll"]
        return {**row, "val_nll": nll if math.isfinite(nll) else None}
    row.update(_evaluate_all(model, tokenizer, cfg))
    row["peak_rss_bytes"] = peak_rss_bytes()
    return row


def save_trained(model, tokenizer, method: str, cfg: CompareConfig, folder: Path) -> None:
    """Keep what a method trained, in the form its users load: a task sketch (plus the
    compressed base when compare made it), a PEFT adapter, or the QLoRA-style LoRA factors."""
    from safetensors.torch import save_file

    from .hub import save_sketched
    from .task_sketch import extract_task_sketch, write_task_sketch

    with atomic_directory(folder, force=True) as temp:
        if sketch_gpr(method, cfg):
            reused = cfg.sketched if sketch_gpr(method, cfg) == cfg.gpr else None
            if not reused:  # the base was compressed in this run: keep it too
                save_sketched(model, tokenizer, temp / "base")
            base = reused or str(folder / "base")
            (temp / "task-sketch").mkdir()
            write_task_sketch(extract_task_sketch(model, {"base": base}), temp / "task-sketch")
        elif method in ("lora", "dora"):
            model.save_pretrained(temp)
        else:  # qlora, loftq: our own layers, so a plain file of the factors and NF4 base
            # (LoftQ's codes are not NF4(W): they come from its initialisation)
            trained = {name: t.detach().contiguous() for name, t in model.state_dict().items()
                       if ".lora_" in name or name.endswith((".codes", ".scales"))}
            rank = next(t for name, t in trained.items() if name.endswith("lora_a")).shape[0]
            save_file(trained, temp / "lora.safetensors", metadata={"rank": str(rank)})
