"""Mixed sketches: each projection taken from one of several sketched folders of the same base,
chosen under a total bit budget so that the summed layer losses are least (issue 23 item 3).

The candidates are whole folders from `sketchtune compress` (any bits, gpr and table encoding);
each folder records every projection's error-compensation loss (`layer_losses`, the
Hessian-weighted output error its codes and tables cost), and the format counts each projection's
stored bits (`format.stored_bits`). `allocate` solves the resulting multiple-choice knapsack; `mix`
assembles the chosen modules into one model whose config names each projection's own settings
(`module_settings`, format version 4). Caveat: each folder was compressed sequentially on its own,
so a mixed model's later blocks were error-compensated for slightly different earlier errors.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from .cliargs import option
from .errors import SketchtuneError
from .format import EXPONENT_SUFFIX, SketchFormatConfig, decode_int8_tables, stored_bits
from .layers import SketchLinear


@dataclass
class MixConfig:
    """`sketchtune mix`: one model from several sketched folders of the same base."""

    bits_per_weight: float = option(
        help="budget: stored bits per sketched weight, codes and tables counted (e.g. 4.17)"
    )

    def __post_init__(self) -> None:
        if not self.bits_per_weight > 0:
            raise SketchtuneError(f"bits_per_weight must be positive, got {self.bits_per_weight}")


@dataclass(frozen=True)
class Allocation:
    """`allocate`'s answer. `lagrangian_*`: the Lagrangian choice the greedy fill started from
    (multiplier `lam`); `lower_bound`: the best Lagrangian dual value seen, a lower bound on the
    optimal loss (and lagrangian_loss - lam * (budget - lagrangian_bits) is another)."""

    choice: tuple[int, ...]  # per layer, the index of its chosen candidate
    loss: float
    bits: float
    lam: float
    lagrangian_loss: float
    lagrangian_bits: float
    lower_bound: float


def allocate(
    losses: Sequence[Sequence[float]], bits: Sequence[Sequence[float]], budget: float,
    iterations: int = 200,
) -> Allocation:
    """Multiple-choice knapsack: one candidate per layer (layer i's candidate j costs bits[i][j]
    and loses losses[i][j]), minimising the summed loss with the summed bits <= budget.

    Lagrangian relaxation: for a multiplier lam each layer takes argmin loss + lam * bits (ties:
    fewer bits); bisection finds the smallest lam whose choice fits. The bits that choice leaves
    unused are then filled greedily: repeatedly the single-layer change that fits with the most
    loss saved per added bit. Raises ValueError when even the cheapest choice does not fit."""
    if len(losses) != len(bits) or not losses:
        raise ValueError("need one candidate list of losses and of bits per layer")
    width = max(len(c) for c in losses)
    loss = np.full((len(losses), width), np.inf)
    cost = np.full((len(losses), width), np.inf)
    for i, (ls, bs) in enumerate(zip(losses, bits, strict=True)):
        if len(ls) != len(bs) or not ls:
            raise ValueError(f"layer {i}: need as many losses as bits, at least one")
        loss[i, : len(ls)], cost[i, : len(bs)] = ls, bs
    rows = np.arange(len(losses))
    valid = np.isfinite(cost)
    cheapest = np.where(valid, cost, np.inf).min(1).sum()
    if cheapest > budget:
        raise ValueError(f"budget {budget} below the cheapest choice ({cheapest} bits)")

    def pick(lam: float) -> tuple[np.ndarray, float]:
        value = np.where(valid, loss + lam * np.where(valid, cost, 0), np.inf)
        choice = np.lexsort((loss, cost, value))[:, 0]  # least value, then bits, then loss
        return choice, float(value[rows, choice].sum() - lam * budget)

    def total(choice: np.ndarray, table: np.ndarray) -> float:
        return float(table[rows, choice].sum())

    choice, lower_bound = pick(0.0)
    lam = 0.0
    if total(choice, cost) > budget:
        low, high = 0.0, 1.0
        while total(pick(high)[0], cost) > budget:
            low, high = high, 2 * high
        for _ in range(iterations):
            middle = (low + high) / 2
            middle_choice, dual = pick(middle)
            lower_bound = max(lower_bound, dual)
            if total(middle_choice, cost) <= budget:
                high = middle
            else:
                low = middle
        lam = high
        choice, dual = pick(high)
        lower_bound = max(lower_bound, dual)
    lagrangian_loss, lagrangian_bits = total(choice, loss), total(choice, cost)
    while True:  # greedy fill of the bits left over
        slack = budget - total(choice, cost)
        saved = loss[rows, choice][:, None] - loss
        added = cost - cost[rows, choice][:, None]
        fits = valid & (saved > 0) & (added <= slack)
        if not fits.any():
            break
        with np.errstate(divide="ignore", invalid="ignore"):
            rate = np.where(added > 0, saved / added, np.inf)
        rate = np.where(fits, rate, -np.inf)
        i, j = np.unravel_index(np.argmax(rate), rate.shape)
        choice[i] = j
    return Allocation(tuple(int(c) for c in choice), total(choice, loss), total(choice, cost),
                      lam, lagrangian_loss, lagrangian_bits, lower_bound)


@dataclass
class Candidate:
    """One sketched folder as `mix` sees it: its config and each projection's (d_out, d_in)."""

    folder: Path
    config: SketchFormatConfig
    shapes: dict[str, tuple[int, int]]

    def bits_of(self, module: str) -> int:
        bits, gpr = self.config.settings_of(module)
        return stored_bits(*self.shapes[module], bits, gpr, self.config.table_encoding_of(module))

    def loss_of(self, module: str) -> float:
        return self.config.layer_losses[module]


def open_candidate(folder: str | Path) -> Candidate:
    """A folder's config and projection shapes, from config.json and the safetensors headers."""
    from .hf_quantizer import read_headers
    from .hub import checkpoint_files, sketch_config_of

    folder = Path(folder)
    config = sketch_config_of(folder)
    if config is None:
        raise SketchtuneError(f"{folder} is not a sketched model folder")
    missing = sorted(set(config.modules) - set(config.layer_losses))
    if missing:
        raise SketchtuneError(
            f"{folder} records no layer loss for {missing[0]} (and {len(missing) - 1} more): "
            "mixing needs folders from data-aware compression"
        )
    headers = read_headers([str(f) for f in checkpoint_files(folder)])
    shapes = {}
    for name in config.modules:
        bits = config.settings_of(name)[0]
        d_out, packed = headers[f"{name}.codes"][1]
        shapes[name] = (d_out, packed * 8 // bits)
    return Candidate(folder, config, shapes)


@dataclass(frozen=True)
class MixPlan:
    """Which candidate each projection comes from, and what the choice costs and loses."""

    candidates: list[Candidate]
    choice: dict[str, int]  # module -> index into candidates
    allocation: Allocation
    weights: int  # sketched weights in all

    @property
    def bits_per_weight(self) -> float:
        return self.allocation.bits / self.weights

    def summary(self) -> dict:
        counts = Counter(self.candidates[i].folder.name for i in self.choice.values())
        return {
            "bits_per_weight": self.bits_per_weight,
            "loss_sum": self.allocation.loss,
            "loss_lower_bound": self.allocation.lower_bound,
            "modules_from": dict(counts.most_common()),
        }


def plan_mix(candidates: list[Candidate], bits_per_weight: float) -> MixPlan:
    """`allocate` over the candidates' modules at `bits_per_weight` stored bits per weight."""
    if not candidates:
        raise SketchtuneError("mix needs at least one sketched folder")
    first = candidates[0]
    for other in candidates[1:]:
        if other.shapes != first.shapes:
            raise SketchtuneError(
                f"{other.folder} does not sketch the same projections as {first.folder}"
            )
        if other.config.learning.get("damp") != first.config.learning.get("damp"):
            raise SketchtuneError(
                f"{other.folder} was learned with another damping than {first.folder}: their "
                "layer losses are not comparable"
            )
    names = list(first.shapes)
    weights = sum(d_out * d_in for d_out, d_in in first.shapes.values())
    losses = [[c.loss_of(n) for c in candidates] for n in names]
    costs = [[c.bits_of(n) for c in candidates] for n in names]
    try:
        allocation = allocate(losses, costs, bits_per_weight * weights)
    except ValueError:
        cheapest = sum(min(c) for c in costs) / weights
        raise SketchtuneError(
            f"a budget of {bits_per_weight} bits per weight is below the cheapest mix of these "
            f"folders ({cheapest:.4f})"
        ) from None
    return MixPlan(candidates, dict(zip(names, allocation.choice, strict=True)), allocation,
                   weights)


def _locations(folder: Path) -> dict[str, str]:
    """Checkpoint key -> the file of `folder` holding it (single-file or sharded)."""
    from .hub import INDEX_NAME, WEIGHTS_NAME

    index = folder / INDEX_NAME
    if index.is_file():
        return json.loads(index.read_text())["weight_map"]
    with safe_open(str(folder / WEIGHTS_NAME), framework="pt") as handle:
        return dict.fromkeys(handle.keys(), WEIGHTS_NAME)


def _read(folder: Path, keys: list[str], where: dict[str, str]) -> dict[str, torch.Tensor]:
    """Some tensors of a folder, opening only the files that hold them."""
    tensors = {}
    for file in sorted({where[k] for k in keys}):
        with safe_open(str(folder / file), framework="pt") as handle:
            tensors.update({k: handle.get_tensor(k) for k in keys if where[k] == file})
    return tensors


def _module_of(candidate: Candidate, name: str, where: dict[str, str]) -> SketchLinear:
    """One stored projection as a SketchLinear with bf16 tables (int8 ones decoded exactly)."""
    keys = [k for k in (f"{name}.codes", f"{name}.values", f"{name}.{EXPONENT_SUFFIX}",
                        f"{name}.bias") if k in where]
    tensors = _read(candidate.folder, keys, where)
    bits, gpr = candidate.config.settings_of(name)
    d_out, d_in = candidate.shapes[name]
    bias = tensors.get(f"{name}.bias")
    layer = SketchLinear(d_in, d_out, bits, gpr, bias=bias is not None)
    values = tensors[f"{name}.values"]
    if candidate.config.table_encoding_of(name) == "int8":
        values = decode_int8_tables(values, tensors[f"{name}.{EXPONENT_SUFFIX}"], torch.bfloat16)
    layer.codes.copy_(tensors[f"{name}.codes"])
    layer.values = torch.nn.Parameter(values.to(torch.bfloat16))
    if bias is not None:
        layer.bias.data = bias.float()
    return layer


def _check_same_base(base: Candidate, other: Candidate, ours: dict[str, str],
                     theirs: dict[str, str]) -> None:
    """Everything but the sketched projections is stored identically: the same source model.
    `ours`, `theirs`: the two folders' `_locations`."""
    projections = tuple(f"{name}." for name in base.config.modules)
    shared = sorted(k for k in ours if not k.startswith(projections))
    if sorted(k for k in theirs if not k.startswith(projections)) != shared:
        raise SketchtuneError(f"{other.folder} and {base.folder} hold different tensors")
    a, b = _read(base.folder, shared, ours), _read(other.folder, shared, theirs)
    for key in shared:
        if not torch.equal(a[key], b[key]):
            raise SketchtuneError(
                f"{other.folder} and {base.folder} differ in {key}: not sketches of one model"
            )


def mix(plan: MixPlan):
    """The planned model: the folder most projections come from, loaded, with every other chosen
    projection read from its own folder; its config records each projection's settings."""
    from .hub import load
    from .serving import serving_disabled
    from .train import freeze_all_but_values

    uses = Counter(plan.choice.values())
    base_index = uses.most_common(1)[0][0]
    base = plan.candidates[base_index]
    where = {i: _locations(plan.candidates[i].folder) for i in uses}
    for index in uses:
        if index != base_index:
            _check_same_base(base, plan.candidates[index], where[base_index], where[index])
    with serving_disabled():
        model = load(base.folder, values_dtype=None)
    shared = {"bits": base.config.bits, "groups_per_row": base.config.groups_per_row,
              "table_encoding": base.config.table_encoding}
    settings, losses = {}, {}
    for name, index in plan.choice.items():
        source = plan.candidates[index]
        if index != base_index:
            model.set_submodule(name, _module_of(source, name, where[index]))
        bits, gpr = source.config.settings_of(name)
        own = {"bits": bits, "groups_per_row": gpr,
               "table_encoding": source.config.table_encoding_of(name)}
        differs = {k: v for k, v in own.items() if v != shared[k]}
        if differs:
            settings[name] = differs
        losses[name] = source.loss_of(name)
    learning = {**base.config.learning,
                "mixed": {**plan.summary(), "sources": [str(c.folder) for c in plan.candidates]}}
    model.config.quantization_config = replace(
        base.config, module_settings=settings, layer_losses=losses, learning=learning,
        fingerprint=None,
    )
    freeze_all_but_values(model)
    return model
