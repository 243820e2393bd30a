"""`sketchtune compare`: every method on the same data, steps, seed and evaluation, side by side.

This module runs the comparison; what each method builds, trains and scores is
`compare_methods`. Each run (one method at one seed, or one rate's short run) is a worker
process, so its peak memory is its own; the worker writes its row to `<output>.run/<run>.json`,
where an interrupted comparison finds it again, and only what is missing reruns. A lock in
`<output>.run/` keeps a second `compare` from writing the same output.

`--lr-grid` first runs each trained method briefly (`lr_grid_steps`, first seed) at every rate of
its family's grid and keeps the rate of lowest NLL on `val_items` examples carved from the
training data (removed from every method's training set, so no run trains on them; test sets
are never looked at). `--seeds N` then trains each method with seeds seed..seed+N-1 (data order
and adapter initialisation). The table leads with the held-out loss (mean NLL per response token
on the test split of the training task), which separates methods at small scale where
accuracies sit at chance.
"""

from __future__ import annotations

import ctypes
import json
import shutil
import signal
import subprocess
import sys
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path

from .atomic import atomic_directory, check_output_dir, write_json_atomic
from .cliargs import option, positive_int
from .compare_methods import METHODS, lr_grid, run_method
from .data.registry import loglik_tasks, task_names
from .errors import SketchtuneError
from .format import SUPPORTED_BITS, SUPPORTED_GPR
from .output_lock import output_lock


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
    calib: str | None = option(
        None, "the sketch's calibration text, as compress --calib; naming --data calibrates on "
        "the examples every method trains on (the validation items left out)",
    )
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


def compare(cfg: CompareConfig, output: str | Path, force: bool = False) -> dict:
    """Run every method (every rate of its grid, then every seed) each in its own process, and
    write the comparison tables and chart."""
    from .report import write_comparison
    from .significance import comparisons

    settings = asdict(cfg)
    earlier = _earlier_results(Path(output), settings)
    # An output with the same settings is extended (its rows reused), anything else replaced.
    check_output_dir(output, force or bool(earlier))
    # Finished runs are kept here, so an interrupted comparison reruns only what is missing.
    folder = Path(f"{output}.run")
    with output_lock(folder, output):
        runs = _Runs(folder, settings, earlier)
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
        shutil.rmtree(folder)
    return results


class _Runs:
    """One method's run at one seed and rate: reused from `<output>.run/` or the earlier
    results when they answer the same settings, else run in its own process and kept."""

    def __init__(self, folder: Path, settings: dict, earlier: dict) -> None:
        self.folder, self.settings = folder, settings
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
        job = {"method": method, "seed": seed, "lr": lr, "tune": tune}
        key = _key(job, tune)
        done = self.folder / f"{key}.json"
        saved = _kept(done)
        if saved is not None and _same_run(saved["settings"], self.settings) and _answers(
            saved["row"], lr
        ):
            print(f"== {key}: finished in an earlier run, reused from {done}", flush=True)
            return saved["row"]
        if key in self.earlier and _answers(self.earlier[key], lr):
            print(f"== {key}: reused from the earlier results (same settings)", flush=True)
            return self.earlier[key]
        print(f"== {key}", flush=True)
        spec = {"job": {**job, "cache": str(self.folder), "result": str(done)}, **self.settings}
        # the worker's prints are progress: this process's stdout is kept for the tables
        proc = subprocess.run([sys.executable, "-m", "sketchtune.compare", json.dumps(spec)],
                              stdout=2, preexec_fn=die_with_parent)
        saved = _kept(done) if proc.returncode == 0 else None
        if saved is None:
            raise SketchtuneError(f"{key} failed (exit {proc.returncode}); see above")
        return saved["row"]


def die_with_parent() -> None:
    """In a job's process before it starts (Linux): SIGTERM when the comparison's process ends, so
    stopping a comparison (or the protocol above it) never leaves a job training on beside the
    next one. Elsewhere nothing."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL("libc.so.6").prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _kept(done: Path) -> dict | None:
    """A run's file: {"settings": .., "row": ..}, or None where it has not finished."""
    return json.loads(done.read_text()) if done.is_file() else None


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


# A kept row's settings lack the fields added after it ran; it ran at their defaults.
_DEFAULTS = {f.name: f.default for f in fields(CompareConfig) if f.default is not MISSING}

# None changes a kept row: which other methods run, where trained weights go, how many seeds.
# A row depends on its own rate (in its key), not on the grid it was one rate of: a grid extended
# by a rate reuses the rows already run.
_NOT_SETTINGS = ("methods", "save_trained", "seeds", "lr_grid_sketch", "lr_grid_lora")


def _same_run(a: dict, b: dict) -> bool:
    """Whether a kept row answers these settings: all must match but those that leave a method's
    row as it is (a row does not depend on which other methods or seeds run beside it). A field
    added since a row was kept counts at its default, which is how that row ran."""
    def settings(d: dict) -> dict:
        return {k: v for k, v in {**_DEFAULTS, **d}.items() if k not in _NOT_SETTINGS}

    return settings(a) == settings(b)


def _worker() -> None:
    """One run, in this process: its row goes to the file the parent named, atomically."""
    spec = json.loads(sys.argv[1])
    job = spec.pop("job")
    result, tune = job.pop("result"), job["tune"]
    row = run_method(job.pop("method"), CompareConfig(**spec), **job)
    if tune:  # marks a rate's short run among the kept rows
        row["tune"] = True
    write_json_atomic(result, {"settings": spec, "row": row})


if __name__ == "__main__":
    _worker()
