"""`sketchtune compare`: every method on the same data, steps, seed and evaluation, side by side.

Methods: the dense model untuned, SketchTune (chosen gpr), LoRA and DoRA through PEFT at the
sketch's trainable-parameter count, and a QLoRA-style 4-bit base + LoRA (our plain-PyTorch NF4
base, see baselines.py), and LoftQ (that base and LoRA, started by LoftQ's alternating NF4 / SVD).
`sketch-gprN` is SketchTune at another gpr (LoRA ranks stay matched to `gpr`). Each method runs in
its own process, so its peak memory is its own.

`--lr-grid` first runs each trained method briefly (`lr_grid_steps`, first seed) at every rate of
its family's grid and keeps the rate of lowest NLL on `val_items` examples carved from the
training data (removed from every method's training set, so no run trains on them; test sets
are never looked at). `--seeds N` then trains each method with seeds seed..seed+N-1 (data order
and adapter initialisation; a sketch starts from its one compression, made once per gpr and kept
in `<output>.run/`). Rows keep every test item's outcome, for the paired tests in the tables.
The table leads with the held-out loss (mean NLL per response token on the test split of the
training task), which separates methods at small scale where accuracies sit at chance.
PEFT adapters (LoRA, DoRA) are merged into the base before evaluation: the same function, and
DoRA unmerged recomputes every weight's column norms on each forward (several times slower).
"""

from __future__ import annotations

import hashlib
import json
import math
import random
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

METHODS = ("dense", "sketch", "lora", "dora", "qlora", "loftq",
           *(f"sketch-gpr{g}" for g in SUPPORTED_GPR))
LORA_FAMILY = ("lora", "dora", "qlora", "loftq")
VAL_SEED = 0  # the validation split is the same whatever the run's seed


def float_list(text: str) -> list[float]:
    """argparse type: "1e-4, 3e-4" -> [0.0001, 0.0003]."""
    return [float(part) for part in text.split(",")]


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
    heldout: str | None = option(
        None, "tasks for the held-out NLL, comma-separated, items pooled (default: the --data task)"
    )
    data_root: str | None = option(None, "folder with the shared data (default ../shared/data)")
    loftq_iterations: int = option(5, "LoftQ's T: rounds of NF4 quantisation and rank-r SVD",
                                   type=positive_int)
    seeds: int = option(1, "seeds per trained method, from --seed up (data order and init)",
                        type=positive_int)
    lr_grid: bool = option(False, "choose each method's rate from its family's grid by the NLL "
                           "on a validation split carved from the training data")
    lr_grid_sketch: list[float] = option(
        help="the sketch methods' rates for --lr-grid (default 3e-5,1e-4,3e-4)",
        factory=lambda: [3e-5, 1e-4, 3e-4], type=float_list,
    )
    lr_grid_lora: list[float] = option(
        help="the LoRA family's rates for --lr-grid (default 1e-4,3e-4,1e-3)",
        factory=lambda: [1e-4, 3e-4, 1e-3], type=float_list,
    )
    lr_grid_steps: int = option(25, "training steps of each rate's short run", type=positive_int)
    val_items: int = option(200, "training examples held out to choose the rates (--lr-grid)",
                            type=positive_int)
    save_trained: str | None = option(  # where, not how: not a setting of the rows
        None, "keep each trained method in DIR/<method> (task sketch, PEFT adapter, ...)",
        metavar="DIR",
    )

    def __post_init__(self) -> None:
        if self.seeds > 1 and self.save_trained:
            raise SketchtuneError("--save-trained keeps one run per method: use it with --seeds 1")
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
                     samples=cfg.calib_samples, seq_len=cfg.calib_seq_len)
            if folder is None:
                freeze_all_but_values(model)
                return model, tokenizer
            save_sketched(model, tokenizer, folder)  # atomic: there only once complete
    # exactly as stored, values in fp32 for training (serving's bf16 head is for inference)
    model, tokenizer = load_any(str(folder), values_dtype=torch.float32, serve=False)
    freeze_all_but_values(model)
    return model, tokenizer


def _base_name(cfg: CompareConfig, gpr: int) -> str:
    """The cached base's folder, named by everything its compression depends on."""
    made = {"model": cfg.model, "bits": cfg.bits, "gpr": gpr, "samples": cfg.calib_samples,
            "seq_len": cfg.calib_seq_len}
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
    from .data.tasks import test_overlap, tokenize_examples

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


def compare(cfg: CompareConfig, output: str | Path, force: bool = False) -> dict:
    """Run every method (every rate of its grid, then every seed) each in its own process, and
    write the comparison tables and chart."""
    from .atomic import check_output_dir
    from .report import write_comparison
    from .significance import comparisons

    settings = asdict(cfg)
    earlier = _earlier_results(Path(output), settings)
    # An output with the same settings is extended (its rows reused), anything else replaced.
    check_output_dir(output, force or bool(earlier))
    # Finished runs are kept here, so an interrupted comparison reruns only what is missing.
    runs = _Runs(Path(f"{output}.run"), settings, earlier)
    trained = [m for m in cfg.methods if m != "dense"]
    search = {m: runs.search(m, lr_grid(m, cfg)) for m in trained} if cfg.lr_grid else {}
    rows = [
        runs.final(m, seed, search[m]["chosen"] if m in search else None)
        for m in cfg.methods
        for seed in ([cfg.seed] if m == "dense" else range(cfg.seed, cfg.seed + cfg.seeds))
    ]
    results = {"settings": settings, "rows": rows, "lr_search": search,
               "comparisons": comparisons(rows)}
    with atomic_directory(output, force=True) as temp:
        write_comparison(results, temp)
    shutil.rmtree(runs.folder)
    return results


class _Runs:
    """One method's run at one seed and rate: reused from `<output>.run/` or the earlier
    results when they answer the same settings, else run in its own process and kept."""

    def __init__(self, folder: Path, settings: dict, earlier: dict) -> None:
        self.folder, self.settings = folder, settings
        folder.mkdir(parents=True, exist_ok=True)
        self.earlier = {_key(r, "tune" in r): r for r in earlier.get("rows", [])}
        for method, found in earlier.get("lr_search", {}).items():
            for rate, nll in found["validation_nll"].items():
                row = {"method": method, "lr": float(rate), "val_nll": nll, "tune": True}
                self.earlier[_key(row, True)] = row

    def search(self, method: str, grid: list[float]) -> dict:
        """Each rate's validation NLL after a short run, and the rate of the lowest."""
        tried = {rate: self.run(method, self.settings["seed"], rate, tune=True)["val_nll"]
                 for rate in grid}
        finite = {rate: nll for rate, nll in tried.items() if nll is not None}
        if not finite:
            raise SketchtuneError(f"{method}: every rate of {grid} diverged; lower the grid")
        return {"chosen": min(finite, key=finite.get),
                "validation_nll": {f"{rate:g}": nll for rate, nll in tried.items()}}

    def final(self, method: str, seed: int, lr: float | None) -> dict:
        return self.run(method, seed, lr, tune=False)

    def run(self, method: str, seed: int, lr: float | None, tune: bool) -> dict:
        from .atomic import write_json_atomic

        job = {"method": method, "seed": seed, "lr": lr, "tune": tune}
        key = _key(job, tune)
        done = self.folder / f"{key}.json"
        saved = json.loads(done.read_text()) if done.is_file() else None
        if saved is not None and _same_run(saved["settings"], self.settings) and _answers(
            saved["row"], lr
        ):
            print(f"== {key}: finished in an earlier run, reused from {done}", flush=True)
            return saved["row"]
        if key in self.earlier and _answers(self.earlier[key], lr):
            print(f"== {key}: reused from the earlier results (same settings)", flush=True)
            return self.earlier[key]
        print(f"== {key}", flush=True)
        spec = {"job": {**job, "cache": str(self.folder)}, **self.settings}
        proc = subprocess.run([sys.executable, "-m", "sketchtune.compare", json.dumps(spec)],
                              stdout=subprocess.PIPE, text=True)
        if proc.returncode != 0:
            raise SketchtuneError(f"{key} failed (exit {proc.returncode}); see above")
        row = {**json.loads(proc.stdout.strip().splitlines()[-1]), **({"tune": True} if tune
                                                                      else {})}
        write_json_atomic(done, {"settings": self.settings, "row": row})
        return row


def _key(job: dict, tune: bool) -> str:
    """A run's name: "lora-lr0.0003" (a rate's short run) or "lora-seed42"."""
    return f"{job['method']}-lr{job['lr']:g}" if tune else f"{job['method']}-seed{job['seed']}"


def _answers(row: dict, lr: float | None) -> bool:
    """Whether a kept row ran at the rate asked for (None: the method's default rate)."""
    return lr is None or row["method"] == "dense" or row.get("lr") == lr


def _earlier_results(output: Path, settings: dict) -> dict:
    """A finished comparison in `output` run with these settings, or {}."""
    try:
        results = json.loads((output / "results.json").read_text())
        if _same_run(results["settings"], settings):
            return results
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


# None changes a kept row: which other methods run, where trained weights go, how many seeds.
_NOT_SETTINGS = ("methods", "save_trained", "seeds")


def _same_run(a: dict, b: dict) -> bool:
    """Whether a kept row answers these settings: all must match but those that leave a method's
    row as it is (a row does not depend on which other methods or seeds run beside it)."""
    def settings(d: dict) -> dict:
        return {k: v for k, v in d.items() if k not in _NOT_SETTINGS}

    return settings(a) == settings(b)


def _worker() -> None:
    spec = json.loads(sys.argv[1])
    job = spec.pop("job")
    print(json.dumps(run_method(job.pop("method"), CompareConfig(**spec), **job)))


if __name__ == "__main__":
    _worker()
