"""Compression quality against GPTQ, HQQ and round-to-nearest at matched bits per weight (issue 23).

Every row compresses the decoder blocks' linear projections of one source model and measures
held-out perplexity on the same windows; the compressing rows use the same calibration windows.
Sources: the grid-free reference (`smollm2-135m-gridfree`, see sketchtune/reference.py) for every
method, and the embedded `smollm2-135m` (dequantized Q4_1 GGUF: every 32-weight block already on
a 16-level grid) as a labelled second reference. Rows, in priority order:

- reference perplexities (both sources);
- RTN and HQQ (data-free, fast): 4-bit groups 128/64/32, and HQQ 3-bit group 64;
- GPTQ with fixed uniform 4-bit grids per group (GPTQ's min-max quantizer, static groups): the
  same Hessians, act order and error compensation as the sketches (`learn.assign_codes`);
- sketches at bits 4 and 3 (gpr 1/2/4/8, those nearest GPTQ's bits per weight first), then 2;
- mixed sketches (`sketch_mixed-<bpw>`, issue 23 item 3) at each GPTQ row's bits per weight: each
  projection taken from one of the kept 3- and 4-bit sketches (gpr 1/2/4/8, bf16 or int8 tables),
  chosen to minimise the summed Hessian-weighted layer losses under the total bit budget
  (`allocate`: Lagrangian relaxation, then a greedy fill). The int8 candidates' losses are the
  recorded loss plus the error the int8 rounding adds, measured with each projection's
  calibration Hessian recomputed through that folder's own sketched model (`int8_losses`).
  Caveat: the layers come from separate sequential (error-compensated) runs, so a mixed model's
  later blocks were compensated for slightly different earlier errors than the ones it has.

Bits per weight count what is stored over all projections: codes, plus per group a fp16 scale and
a `bits`-wide integer zero (GPTQ/RTN, as GPTQ packs qzeros), a fp16 scale and fp16 zero (HQQ), or
per (row, group) 2**bits bf16 table entries (sketches; int8 entries plus a bf16 scale for the
`sketch_int8` rows, issue 23 item 3, measured from the kept sketch folders); a mixed row sums
its projections' own counts.

Resumable: each finished row is written (atomically) to the JSON and CSV at once, and a rerun with
the same settings skips the rows already there. The Pareto picture is redrawn after every row.
Copies started side by side share the rows (each claims a row before running it).

    nice -n 5 .venv/bin/python benchmarks/compress_quality.py [--samples 16 --heldout 16]
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import functools
import io
import json
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from machine import cpu_model, machine_line
from torch import nn
from transformers import AutoTokenizer

from sketchtune import compression
from sketchtune.analyze.sources import collect_hessians
from sketchtune.api import compress, heldout_perplexity, load
from sketchtune.atomic import write_json_atomic
from sketchtune.compression import SketchConfig, round_to_storage
from sketchtune.data.text import calibration_texts, token_windows
from sketchtune.format import SketchedWeight
from sketchtune.hub import save_sketched
from sketchtune.layers import SketchLinear, sketched_layers
from sketchtune.learn import assign_codes, prepare
from sketchtune.reference import GRID_FREE_NAME, RECIPE, REPORT_NAME, grid_free_path
from sketchtune.sources import load_dense, resolve_model

SOURCES = {"gridfree": GRID_FREE_NAME, "dequantized": "smollm2-135m"}
LABELS = {
    "gridfree": "grid-free reference (fine-tuned off the Q4_1 grid)",
    "dequantized": "dequantized Q4_1 GGUF (every 32-block on a 16-level grid)",
}


@dataclass(frozen=True)
class Row:
    # reference | rtn | hqq | gptq | sketch | sketch_int8 (see int8_tables) | sketch_mixed
    method: str
    source: str  # a key of SOURCES
    bits: int = 16
    # columns per group (rtn, hqq, gptq), groups per row (sketch), or for sketch_mixed the group
    # of the GPTQ row (of `bits` bits) whose bits per weight is the budget
    group: int = 0

    @property
    def key(self) -> str:
        if self.method == "reference":
            return f"reference-{self.source}"
        if self.method == "sketch_mixed":
            return f"sketch_mixed-{mixed_budget(self):.4f}".rstrip("0")
        if self.method == "sketch_int8":
            return f"sketch{self.bits}-gpr{self.group}-int8"
        size = f"gpr{self.group}" if self.method == "sketch" else f"g{self.group}"
        suffix = "" if self.source == "gridfree" else f"-{self.source}"
        return f"{self.method}{self.bits}-{size}{suffix}"


def planned_rows() -> list[Row]:
    """All rows, fastest and most needed first (the run may be stopped and resumed anywhere)."""
    rows = [Row("reference", "gridfree"), Row("reference", "dequantized")]
    rows += [Row("rtn", "gridfree", 4, g) for g in (128, 64, 32)]
    rows += [Row("hqq", "gridfree", 4, g) for g in (128, 64, 32)] + [Row("hqq", "gridfree", 3, 64)]
    rows += [Row("gptq", "gridfree", 4, g) for g in (128, 64, 32)]
    # Sketches by what the verdict needs first: the bits per weight GPTQ reaches (4.16-4.63)
    # are met by 4-bit gpr 1 and 3-bit gpr 1/2; then the rest of 4 and 3 bits; 2 bits last.
    order = [(4, 1), (3, 1), (4, 2), (3, 2), (4, 4), (3, 4), (4, 8), (3, 8)]
    rows += [Row("sketch", "gridfree", b, gpr) for b, gpr in order[:4]]
    # Issue 23 item 3: the same sketches with int8 tables (a bf16 scale per table)
    rows += [Row("sketch_int8", "gridfree", b, gpr) for b, gpr in order[:4]]
    rows += [Row("sketch", "gridfree", b, gpr) for b, gpr in order[4:]]
    rows += [Row("sketch", "gridfree", 2, gpr) for gpr in (1, 2, 4, 8)]
    # The grid effect the grid-free reference removes: group-32 quantizers on the Q4_1 weights.
    rows += [Row(m, "dequantized", 4, 32) for m in ("rtn", "hqq")]
    # Issue 23 item 3: per-projection choice of sketch under GPTQ's budgets (needs the kept
    # 3- and 4-bit folders above; skipped until they are all there)
    rows += [Row("sketch_mixed", "gridfree", 4, g) for g in (128, 64, 32)]
    return rows


MIXED_CANDIDATES = [(b, gpr) for b in (4, 3) for gpr in (1, 2, 4, 8)]  # (bits, gpr) folders


def projection_names(model: nn.Module) -> dict[str, nn.Module]:
    """The decoder blocks' linear projections, what every method compresses (nn.Linear, or
    SketchLinear once sketched), by their names in the model."""
    blocks_name, blocks = compression.find_decoder_blocks(model)
    return {
        f"{blocks_name}.{index}.{name}": module
        for index, block in enumerate(blocks)
        for name, module in block.named_modules()
        if isinstance(module, nn.Linear | SketchLinear)
    }


@functools.cache
def projection_shapes(source: str) -> dict[str, tuple[int, int]]:
    """(d_out, d_in) of every projection of a source, from its config alone (a meta model)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(resolve_model(SOURCES[source]))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return {name: tuple(m.weight.shape) for name, m in projection_names(model).items()}


def mixed_budget(row: Row) -> float:
    """A mixed row's budget: the bits per weight of GPTQ at the row's bits and group."""
    shapes = list(projection_shapes(row.source).values())
    gptq = Row("gptq", row.source, row.bits, row.group)
    return stored_bits(gptq, shapes) / sum(d_out * d_in for d_out, d_in in shapes)


def uniform_grid(weight: torch.Tensor, group: int, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ's asymmetric min-max grid per (row, group of `group` columns; the last may be short):
    range widened to hold 0, integer zero point. Returns (tables (d_out, n_groups, 2**bits),
    group_of (d_in,))."""
    d_out, d_in = weight.shape
    group_of = torch.arange(d_in) // group
    index = group_of.expand(d_out, d_in)
    n_groups = int(group_of[-1]) + 1
    low = torch.zeros(d_out, n_groups).scatter_reduce(1, index, weight, "amin")
    high = torch.zeros(d_out, n_groups).scatter_reduce(1, index, weight, "amax")
    levels = (1 << bits) - 1
    scale = ((high - low) / levels).clamp_min(1e-8)
    zero = torch.round(-low / scale)
    tables = scale[..., None] * (torch.arange(levels + 1) - zero[..., None])
    return tables, group_of


def dequantize_grouped(tables: torch.Tensor, group_of: torch.Tensor, codes: torch.Tensor):
    """W[r, c] = tables[r, group_of[c], codes[r, c]] for any column-to-group map."""
    per_column = tables[:, group_of, :]  # (d_out, d_in, K)
    return per_column.gather(2, codes[..., None].long()).squeeze(2)


def apply_rtn(model: nn.Module, bits: int, group: int) -> None:
    for linear in projection_names(model).values():
        w = linear.weight.detach().float()
        tables, group_of = uniform_grid(w, group, bits)
        codes = (w[..., None] - tables[:, group_of, :]).abs().argmin(-1)
        linear.weight.data.copy_(dequantize_grouped(tables, group_of, codes))


def apply_hqq(model: nn.Module, bits: int, group: int) -> None:
    """HQQ's own quantizer (half-quadratic zero/scale optimisation, data-free), groups along the
    input dimension (axis=1), fp16 scale and zero as HQQ stores them."""
    from hqq.core.quantize import Quantizer

    for linear in projection_names(model).values():
        quantized, meta = Quantizer.quantize(
            linear.weight.detach().float(), nbits=bits, group_size=group, axis=1,
            optimize=True, bitpack=False, compute_dtype=torch.float16, device="cpu",
        )
        linear.weight.data.copy_(Quantizer.dequantize(quantized, meta).float())


@contextlib.contextmanager
def uniform_gptq_steps(bits: int, group: int) -> Iterator[None]:
    """Make `compress` learn fixed uniform grids instead of sketches: the same calibration,
    block order, shared-input steps and Hessians, then `assign_codes`; the projections stay
    nn.Linear holding the dequantized grid weights."""

    def step(block, names, hessian, config):
        linears = [block.get_submodule(n) for n in names]
        prepared = prepare(torch.cat([lin.weight.detach().float() for lin in linears]), hessian,
                           config.damp, config.act_order)
        tables, group_of = uniform_grid(prepared.weight, group, bits)
        codes, _ = assign_codes(prepared, tables, group_of, config.column_batch)
        weight = dequantize_grouped(tables, group_of, codes)
        for lin, part in zip(linears, weight.split([lin.out_features for lin in linears]),
                             strict=True):
            lin.weight.data.copy_(part)
        return {}

    original = compression._sketch_step
    compression._sketch_step = step
    try:
        yield
    finally:
        compression._sketch_step = original


def stored_bits(row: Row, shapes: list[tuple[int, int]]) -> int:
    """Bits a row stores for projections of these (d_out, d_in) shapes."""
    total = 0
    for d_out, d_in in shapes:
        codes = row.bits * d_out * d_in
        if row.method == "sketch":
            total += codes + 16 * d_out * row.group * (1 << row.bits)
        elif row.method == "sketch_int8":
            total += codes + (8 * (1 << row.bits) + 16) * d_out * row.group
        elif row.method == "hqq":  # groups of the flattened weight (HQQ reshapes to (-1, g))
            total += codes + 32 * (d_out * d_in // row.group)
        else:  # gptq, rtn: fp16 scale + bits-wide zero per (row, group)
            total += codes + (16 + row.bits) * d_out * -(-d_in // row.group)
    return total


def int8_tables(model: nn.Module) -> None:
    """Round every table to int8 levels times one bf16 scale (its absmax / 127): 8 + 16/2**bits
    bits per entry instead of 16; bf16 keeps 8 significant bits, so little should be lost."""
    for layer in sketched_layers(model).values():
        int8_layer(layer)


def int8_layer(layer: SketchLinear) -> None:
    """`int8_tables` for one layer, in place."""
    values = layer.values.data
    values.copy_(int8_values(values))


def int8_values(values: torch.Tensor) -> torch.Tensor:
    """(..., K) tables rounded to int8 levels times one bf16 scale per table (`int8_tables`)."""
    scale = (values.abs().amax(-1, keepdim=True) / 127).to(torch.bfloat16).float()
    scale = scale.clamp_min(torch.finfo(torch.bfloat16).tiny)
    return (values / scale).round().clamp(-127, 127) * scale


def kept_folder(row: Row, args: argparse.Namespace) -> Path:
    return Path(args.keep) / f"sketch{row.bits}-gpr{row.group}"


def run_row(row: Row, args: argparse.Namespace) -> dict | None:
    """The row's entry, or None when it cannot run yet (a mixed row's folders are missing)."""
    if row.method == "sketch_int8":
        return run_int8_row(row, args)
    if row.method == "sketch_mixed":
        return run_mixed_row(row, args)
    model, tokenizer = load_dense(SOURCES[row.source])
    shapes = [tuple(lin.weight.shape) for lin in projection_names(model).values()]
    start = time.perf_counter()
    entry: dict = {}
    if row.method == "sketch":
        config = SketchConfig(bits=row.bits, gpr=row.group)
        compress(model, tokenizer, config, samples=args.samples, seq_len=args.seq_len,
                 progress=False)
        entry["loss_sum"] = sum(model.config.quantization_config.layer_losses.values())
        save_sketched(model, tokenizer, kept_folder(row, args), force=True)  # for sketch_int8
    elif row.method == "gptq":
        with uniform_gptq_steps(row.bits, row.group):
            compress(model, tokenizer, SketchConfig(bits=4, gpr=1), samples=args.samples,
                     seq_len=args.seq_len, progress=False)
    elif row.method in ("rtn", "hqq"):
        (apply_rtn if row.method == "rtn" else apply_hqq)(model, row.bits, row.group)
        round_to_storage(model)  # as the sketches and GPTQ: every tensor as stored, bf16
    entry["compress_seconds"] = round(time.perf_counter() - start, 1)
    ppl = heldout_perplexity(model, tokenizer, args.heldout, args.seq_len, progress=False)
    weights = sum(d_out * d_in for d_out, d_in in shapes)
    bits_per_weight = 32.0 if row.method == "reference" else stored_bits(row, shapes) / weights
    return {**asdict(row), "key": row.key, "bits_per_weight": bits_per_weight,
            "perplexity": ppl["perplexity"], "nll_per_token": ppl["nll_per_token"], **entry}


def run_int8_row(row: Row, args: argparse.Namespace) -> dict:
    """The kept sketch folder of the same bits and gpr, its tables rounded by `int8_tables`."""
    folder = kept_folder(row, args)
    model = load(folder, values_dtype=torch.float32, serve=False)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    shapes = [(lin.out_features, lin.in_features) for lin in sketched_layers(model).values()]
    int8_tables(model)
    ppl = heldout_perplexity(model, tokenizer, args.heldout, args.seq_len, progress=False)
    weights = sum(d_out * d_in for d_out, d_in in shapes)
    return {**asdict(row), "key": row.key, "bits_per_weight": stored_bits(row, shapes) / weights,
            "perplexity": ppl["perplexity"], "nll_per_token": ppl["nll_per_token"],
            "compress_seconds": 0.0}


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


def calibration_windows(tokenizer, args: argparse.Namespace) -> torch.Tensor:
    """The calibration windows `compress` took for the sketch rows (its default seed)."""
    return token_windows(tokenizer, calibration_texts(), args.samples, args.seq_len, seed=0)


def input_hessians(model: nn.Module, windows: torch.Tensor, batch_size: int = 4) -> dict:
    """Each projection's input Hessian as `compress_model` takes it (`InputHessian` over the
    calibration tokens reaching it), from the windows run through `model` itself: in a sketched
    model every projection sees what it saw while being sketched, the blocks and steps before
    it already sketched. Projections reading one tensor (q, k, v; gate, up) share one Hessian."""
    return collect_hessians(model, list(projection_names(model)), windows, batch_size)


def hessian_loss(weight: torch.Tensor, sketch: torch.Tensor, hessian: torch.Tensor,
                 damp: float) -> float:
    """GPTQ's loss of replacing `weight` by `sketch`, tr((W - Q) H (W - Q)ᵀ) / 2 with H damped
    and dead columns handled as `learn.prepare` does: what `assign_codes` sums in its row loss
    (the errors it records are (W - Q) in the Cholesky basis of the damped H⁻¹)."""
    w, h = weight.float().clone(), hessian.float().clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += damp * h.diagonal().mean() * torch.eye(h.shape[0])
    delta = w - sketch.float()
    return float(((delta @ h) * delta).sum() / 2)


def int8_losses(folder: Path, dense: dict[str, torch.Tensor], args: argparse.Namespace) -> dict:
    """Per projection of a kept sketch folder: its recorded layer loss, the same loss recomputed
    here (`hessian_loss`, calibration Hessians through the folder's own model: a check on the
    recomputation), and with its tables rounded by `int8_values`. Cached beside the folder
    (keyed by its fingerprint and the calibration settings): one calibration pass each."""
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    cache = folder.with_name(f"{folder.name}.int8-losses.json")
    key = {"fingerprint": config["fingerprint"], "samples": args.samples,
           "seq_len": args.seq_len}
    if cache.is_file():
        cached = json.loads(cache.read_text())
        if cached.get("key") == key:
            return cached["losses"]
    model = load(folder, values_dtype=torch.float32, serve=False)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    hessians = input_hessians(model, calibration_windows(tokenizer, args))
    damp = config["learning"]["damp"]
    losses = {}
    for name, layer in sketched_layers(model).items():
        sketch = layer.sketch()
        int8 = SketchedWeight(sketch.codes, int8_values(sketch.values), sketch.bits,
                              sketch.in_features)
        losses[name] = {
            "recorded": config["layer_losses"][name],
            "recomputed": hessian_loss(dense[name], sketch.dequantize(), hessians[name], damp),
            "int8": hessian_loss(dense[name], int8.dequantize(), hessians[name], damp),
        }
    write_json_atomic(cache, {"key": key, "losses": losses})
    return losses


def mixed_candidates(args: argparse.Namespace, output: Path) -> list[tuple[int, int]]:
    """The (bits, gpr) sketch folders finished and kept for the rows in `output`."""
    done = finished_rows(output)
    return [(b, gpr) for b, gpr in MIXED_CANDIDATES
            if Row("sketch", "gridfree", b, gpr).key in done
            and (kept_folder(Row("sketch", "gridfree", b, gpr), args) / "config.json").is_file()]


def run_mixed_row(row: Row, args: argparse.Namespace) -> dict | None:
    """Each projection from the candidate (bits, gpr, bf16 or int8 tables) that `allocate`
    picks for the budget, the layer losses as the objective: a bf16 candidate's loss is its
    folder's recorded one, an int8 candidate's that plus what the rounding adds (int8 minus
    bf16, both recomputed by `int8_losses`). The model is assembled from the folders' modules
    and measured as every row; its bits per weight sum each projection's own count."""
    present = mixed_candidates(args, Path(args.output))
    missing = [f"sketch{b}-gpr{g}" for b, g in MIXED_CANDIDATES if (b, g) not in present]
    if not present or (missing and not args.mixed_partial):
        print(f"{row.key}: skipped, waiting for {', '.join(missing)}", flush=True)
        return None
    start = time.perf_counter()
    shapes = projection_shapes(row.source)
    budget = mixed_budget(row)
    weights = sum(d_out * d_in for d_out, d_in in shapes.values())
    dense_model, _ = load_dense(SOURCES[row.source])
    dense = {n: m.weight.detach().float() for n, m in projection_names(dense_model).items()}
    del dense_model
    options: list[tuple[str, Row]] = []  # (candidate key, its Row for stored_bits)
    measured: dict[tuple[int, int], dict] = {}
    for b, gpr in present:
        measured[b, gpr] = int8_losses(kept_folder(Row("sketch", row.source, b, gpr), args),
                                       dense, args)
        options += [(Row(m, row.source, b, gpr).key, Row(m, row.source, b, gpr))
                    for m in ("sketch", "sketch_int8")]
    names = list(shapes)
    losses, costs = [], []
    for name in names:
        layer_losses, layer_bits = [], []
        for _key, option in options:
            entry = measured[option.bits, option.group][name]
            added = entry["int8"] - entry["recomputed"] if option.method == "sketch_int8" else 0
            layer_losses.append(entry["recorded"] + added)
            layer_bits.append(stored_bits(option, [shapes[name]]))
        losses.append(layer_losses)
        costs.append(layer_bits)
    try:
        allocation = allocate(losses, costs, budget * weights)
    except ValueError as err:  # only with --mixed-partial: the folders there cost too much
        print(f"{row.key}: skipped, {err}", flush=True)
        return None
    chosen = {name: options[j] for name, j in zip(names, allocation.choice, strict=True)}
    model = mixed_model(chosen, args)
    tokenizer = AutoTokenizer.from_pretrained(kept_folder(chosen[names[0]][1], args))
    seconds = time.perf_counter() - start
    ppl = heldout_perplexity(model, tokenizer, args.heldout, args.seq_len, progress=False)
    stored = sum(stored_bits(option, [shapes[name]]) for name, (_k, option) in chosen.items())
    counts: dict[str, int] = {}
    for key, _option in chosen.values():
        counts[key] = counts.get(key, 0) + 1
    checks = [e["recomputed"] / e["recorded"] for m in measured.values() for e in m.values()
              if e["recorded"] > 0]
    return {
        **asdict(row), "key": row.key, "bits_per_weight": stored / weights,
        "perplexity": ppl["perplexity"], "nll_per_token": ppl["nll_per_token"],
        "compress_seconds": round(seconds, 1),  # int8 losses (unless cached), allocation, build
        "loss_sum": allocation.loss,
        "budget_of": Row("gptq", row.source, row.bits, row.group).key,
        "budget_bits_per_weight": budget,
        "candidates": [key for key, _option in options],
        "missing_candidates": missing,
        "allocation": dict(sorted(counts.items(), key=lambda kv: -kv[1])),
        "choices": {name: key for name, (key, _option) in chosen.items()},
        "lagrange_multiplier": allocation.lam,
        "lagrangian_loss_sum": allocation.lagrangian_loss,
        "lagrangian_bits_per_weight": allocation.lagrangian_bits / weights,
        "loss_lower_bound": allocation.lower_bound,
        "recomputed_over_recorded_loss": [min(checks), max(checks)],
        "note": "layers from separate sequential (error-compensated) runs: a mixed model's "
                "later blocks were compensated for slightly different earlier errors; int8 "
                "candidates' losses = recorded loss + (int8 - bf16) Hessian-weighted error, "
                "Hessians recomputed through each folder's own sketched model",
    }


def mixed_model(chosen: dict[str, tuple[str, Row]], args: argparse.Namespace) -> nn.Module:
    """One model holding, per projection, the chosen folder's SketchLinear (its tables rounded
    to int8 for an int8 choice); everything else as stored, the same in every folder (checked)."""
    by_folder: dict[tuple[int, int], list[str]] = {}
    for name, (_key, option) in chosen.items():
        by_folder.setdefault((option.bits, option.group), []).append(name)
    model = None
    for (b, gpr), names in by_folder.items():
        loaded = load(kept_folder(Row("sketch", "gridfree", b, gpr), args),
                      values_dtype=torch.float32, serve=False)
        if model is None:
            model = loaded
        else:
            theirs, ours = loaded.state_dict(), model.state_dict()
            projection_prefixes = tuple(f"{n}." for n in chosen)
            for key, tensor in theirs.items():
                if not key.startswith(projection_prefixes) and not torch.equal(tensor, ours[key]):
                    raise SystemExit(f"sketch{b}-gpr{gpr} differs from the others in {key}")
        for name in names:
            layer = loaded.get_submodule(name)
            if chosen[name][1].method == "sketch_int8":
                int8_layer(layer)
            if loaded is not model:
                model.set_submodule(name, layer)
    return model


def finished_rows(output: Path) -> set[str]:
    return set(json.loads(output.read_text())["rows"]) if output.is_file() else set()


def claims_folder(output: Path) -> Path:
    folder = output.with_name(f".{output.name}.claims")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def claim(output: Path, key: str) -> bool:
    """Whether this process runs row `key`: it created the row's claim file, or the process that
    did is gone. Several copies of this script can then share the rows (one thread each runs
    better than one process with two threads on a busy machine)."""
    path = claims_folder(output) / key
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        text = path.read_text().strip()
        if not text or _alive(int(text)):  # empty: the claimant is writing its pid
            return False
        path.unlink(missing_ok=True)
        return claim(output, key)
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    return True


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        pass
    return True


def load_results(path: Path, settings: dict) -> dict:
    if not path.is_file():
        return {"settings": settings, "rows": {}}
    results = json.loads(path.read_text())
    if results.get("settings") != settings:
        raise SystemExit(
            f"{path} holds rows measured with other settings {results.get('settings')}; "
            "pass another --output or delete it"
        )
    return results


def with_ratios(results: dict) -> dict:
    """Each row's perplexity over its source's reference perplexity."""
    rows = results["rows"]
    for entry in rows.values():
        reference = rows.get(f"reference-{entry['source']}")
        if reference is not None:
            entry["ratio_to_reference"] = entry["perplexity"] / reference["perplexity"]
    return results


def verdict(rows: dict) -> list[dict]:
    """At each GPTQ point: the best sketch (uniform, int8 tables or mixed) at no more bits per
    weight against GPTQ there and the best HQQ at no more bits (or, when none is that small, HQQ
    at the same group)."""
    def best(methods: tuple[str, ...], limit: float) -> dict | None:
        fits = [r for r in rows.values() if r["method"] in methods and r["source"] == "gridfree"
                and r["bits_per_weight"] <= limit + 1e-9]
        return min(fits, key=lambda r: r["perplexity"], default=None)

    out = []
    for gptq in sorted((r for r in rows.values() if r["method"] == "gptq"),
                       key=lambda r: r["bits_per_weight"]):
        bpw = gptq["bits_per_weight"]
        sketch = best(("sketch", "sketch_int8", "sketch_mixed"), bpw)
        hqq = best(("hqq",), bpw) or rows.get(f"hqq4-g{gptq['group']}")
        rivals = [gptq["perplexity"]] + ([hqq["perplexity"]] if hqq else [])
        out.append({
            "gptq": gptq["key"], "bits_per_weight": bpw, "gptq_perplexity": gptq["perplexity"],
            "hqq": hqq and hqq["key"], "hqq_perplexity": hqq and hqq["perplexity"],
            "best_sketch": sketch and sketch["key"],
            "sketch_perplexity": sketch and sketch["perplexity"],
            "sketch_wins": bool(sketch) and sketch["perplexity"] < min(rivals),
        })
    return out


CSV_FIELDS = ["key", "method", "source", "bits", "group", "bits_per_weight", "perplexity",
              "ratio_to_reference", "compress_seconds", "loss_sum"]


def write_outputs(results: dict, output: Path) -> None:
    """Merge with rows another run has written meanwhile, then JSON, CSV and PNG."""
    if output.is_file():
        results["rows"] = {**json.loads(output.read_text())["rows"], **results["rows"]}
    report = grid_free_path() / REPORT_NAME
    if report.is_file():
        reference = json.loads(report.read_text())
        results["grid_free_reference"] = {k: v for k, v in reference.items() if k != "train_losses"}
    results = with_ratios(results)
    results["verdict"] = verdict(results["rows"])
    write_json_atomic(output, results)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, CSV_FIELDS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(results["rows"].values())
    csv_path = output.with_suffix(".csv")
    temp = csv_path.with_name(f".{csv_path.name}.tmp-{os.getpid()}")
    temp.write_text(buffer.getvalue())
    os.replace(temp, csv_path)
    plot_pareto(results["rows"], output.with_suffix(".png"))


def plot_pareto(rows: dict, path: Path) -> None:
    """Held-out perplexity against stored bits per weight, one line per method (grid-free
    reference), the reference perplexities as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    series: dict[str, list[dict]] = {}
    for entry in rows.values():
        if entry["method"] != "reference" and entry["source"] == "gridfree":
            label = {"sketch": f"sketch {entry['bits']}-bit (gpr 1/2/4/8)",
                     "sketch_int8": f"sketch {entry['bits']}-bit, int8 tables",
                     "sketch_mixed": "sketch mixed per projection (at GPTQ's bits/weight)"}.get(
                entry["method"], f"{entry['method'].upper()} {entry['bits']}-bit")
            series.setdefault(label, []).append(entry)
    for label, entries in sorted(series.items()):
        entries.sort(key=lambda r: r["bits_per_weight"])
        xs = [r["bits_per_weight"] for r in entries]
        ys = [r["perplexity"] for r in entries]
        ax.plot(xs, ys, marker="o", label=label)
        for r in entries:
            text = (f"{r['group']}" if r["method"] in ("sketch", "sketch_int8")
                    else "" if r["method"] == "sketch_mixed" else f"g{r['group']}")
            ax.annotate(text, (r["bits_per_weight"], r["perplexity"]), fontsize=7,
                        textcoords="offset points", xytext=(3, 3))
    for source, style in (("gridfree", "-"), ("dequantized", ":")):
        reference = rows.get(f"reference-{source}")
        if reference:
            ax.axhline(reference["perplexity"], color="gray", linestyle=style,
                       label=f"{LABELS[source]}: {reference['perplexity']:.2f}")
    ax.set_xlabel("stored bits per weight (codes + tables or scales/zeros)")
    ax.set_ylabel("held-out perplexity (log scale)")
    ax.set_yscale("log")
    ax.set_title("SmolLM2-135M, grid-free reference: perplexity against bits per weight")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    temp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.png")
    fig.savefig(temp, dpi=120)
    plt.close(fig)
    os.replace(temp, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=16, help="calibration windows")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--heldout", type=int, default=16, help="held-out windows")
    parser.add_argument("--only", nargs="*", help="run only these row keys")
    parser.add_argument("--output", default="benchmarks/results/compress_pareto.json")
    parser.add_argument("--keep", default="runs/compress_pareto", help="sketched folders kept")
    parser.add_argument("--mixed-partial", action="store_true",
                        help="measure the sketch_mixed rows from the candidate folders there "
                        "are (default: skip them until every 3- and 4-bit folder is kept)")
    args = parser.parse_args()
    print(machine_line(), flush=True)
    settings = {"samples": args.samples, "seq_len": args.seq_len, "heldout": args.heldout,
                "reference_recipe": asdict(RECIPE)}
    output = Path(args.output)
    results = load_results(output, settings)
    results["cpu"] = cpu_model()
    for row in planned_rows():
        if args.only and row.key not in args.only:
            continue
        if row.key in finished_rows(output) or not claim(output, row.key):
            continue
        entry = run_row(row, args)
        if entry is None:  # not runnable yet: leave it to a later run
            (claims_folder(output) / row.key).unlink()
            continue
        results["rows"][row.key] = entry
        write_outputs(results, output)
        (claims_folder(output) / row.key).unlink()
        print(f"{row.key:28s} {entry['bits_per_weight']:6.3f} bits/weight  perplexity "
              f"{entry['perplexity']:8.3f}  ratio {entry.get('ratio_to_reference', 0):.4f}  "
              f"({entry['compress_seconds']:.0f} s)", flush=True)
    for line in results.get("verdict", []):
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
