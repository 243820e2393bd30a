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
- int8-table sketches (`sketchB-gprG-int8`, issue 23 item 3): the kept sketch folders with their
  tables in the format's int8 encoding (`format.round_int8_tables`: int8 levels times a power of
  two per table), written as folders of their own (`int8_folder`) and measured as loaded;
- mixed sketches (`sketch_mixed-<bpw>`, issue 23 item 3) at each GPTQ row's bits per weight:
  `sketchtune mix` (`mixing.plan_mix` + `mixing.mix`) over the kept 3- and 4-bit folders, bf16
  and int8 (gpr 1/2/4/8): each projection from the folder that minimises the summed recorded
  layer losses under the budget. An int8 folder's recorded losses are the bf16 folder's plus the
  error the rounding adds, measured with each projection's calibration Hessian recomputed through
  that folder's own sketched model (`int8_losses`). Caveat: the layers come from separate
  sequential (error-compensated) runs, so a mixed model's later blocks were compensated for
  slightly different earlier errors than the ones it has.

Bits per weight count what is stored over all projections: codes, plus per group a fp16 scale and
a `bits`-wide integer zero (GPTQ/RTN, as GPTQ packs qzeros), a fp16 scale and fp16 zero (HQQ), or
per (row, group) 2**bits bf16 table entries (sketches; int8 entries plus an int8 exponent for the
int8 rows): `format.stored_bits`; a mixed row sums its projections' own counts.

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
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

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
from sketchtune.errors import SketchtuneError
from sketchtune.format import SketchedWeight, round_int8_tables
from sketchtune.format import stored_bits as sketch_bits
from sketchtune.hessian import weighted_error
from sketchtune.hub import format_of, save_sketched, sketch_config_of
from sketchtune.layers import SketchLinear, sketched_layers
from sketchtune.learn import assign_codes, prepare
from sketchtune.mixing import mix, open_candidate, plan_mix
from sketchtune.reference import GRID_FREE_NAME, RECIPE, REPORT_NAME, grid_free_path
from sketchtune.sources import load_dense, resolve_model

SOURCES = {"gridfree": GRID_FREE_NAME, "dequantized": "smollm2-135m"}
LABELS = {
    "gridfree": "grid-free reference (fine-tuned off the Q4_1 grid)",
    "dequantized": "dequantized Q4_1 GGUF (every 32-block on a 16-level grid)",
}


@dataclass(frozen=True)
class Row:
    # reference | rtn | hqq | gptq | sketch | sketch_int8 (see int8_folder) | sketch_mixed
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
    # Issue 23 item 3: the same sketches with int8 tables (the format's int8 encoding)
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
        if row.method in ("sketch", "sketch_int8"):
            encoding = "int8" if row.method == "sketch_int8" else "float"
            total += sketch_bits(d_out, d_in, row.bits, row.group, encoding)
        elif row.method == "hqq":  # groups of the flattened weight (HQQ reshapes to (-1, g))
            total += codes + 32 * (d_out * d_in // row.group)
        else:  # gptq, rtn: fp16 scale + bits-wide zero per (row, group)
            total += codes + (16 + row.bits) * d_out * -(-d_in // row.group)
    return total


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
    """The kept sketch folder of the same bits and gpr in the int8 encoding (`int8_folder`),
    loaded as users load it."""
    folder = int8_folder(row.bits, row.group, args)
    model = load(folder, values_dtype=torch.float32, serve=False)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    shapes = [(lin.out_features, lin.in_features) for lin in sketched_layers(model).values()]
    ppl = heldout_perplexity(model, tokenizer, args.heldout, args.seq_len, progress=False)
    weights = sum(d_out * d_in for d_out, d_in in shapes)
    return {**asdict(row), "key": row.key, "bits_per_weight": stored_bits(row, shapes) / weights,
            "perplexity": ppl["perplexity"], "nll_per_token": ppl["nll_per_token"],
            "loss_sum": sum(format_of(model).layer_losses.values()), "compress_seconds": 0.0}


def calibration_windows(tokenizer, args: argparse.Namespace) -> torch.Tensor:
    """The calibration windows `compress` took for the sketch rows (its default seed)."""
    return token_windows(tokenizer, calibration_texts(), args.samples, args.seq_len, seed=0)


def input_hessians(model: nn.Module, windows: torch.Tensor, batch_size: int = 4) -> dict:
    """Each projection's input Hessian as `compress_model` takes it (`InputHessian` over the
    calibration tokens reaching it), from the windows run through `model` itself: in a sketched
    model every projection sees what it saw while being sketched, the blocks and steps before
    it already sketched. Projections reading one tensor (q, k, v; gate, up) share one Hessian."""
    return collect_hessians(model, list(projection_names(model)), windows, batch_size)


def int8_losses(folder: Path, dense: dict[str, torch.Tensor], args: argparse.Namespace) -> dict:
    """Per projection of a kept sketch folder: its recorded layer loss, the same loss recomputed
    here (`hessian.weighted_error`, calibration Hessians through the folder's own model: a check
    on the recomputation), and with its tables in the int8 encoding. Cached beside the folder
    (keyed by its fingerprint, the encoding and the calibration settings): one calibration pass
    each."""
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    cache = folder.with_name(f"{folder.name}.int8-losses.json")
    key = {"fingerprint": config["fingerprint"], "samples": args.samples,
           "seq_len": args.seq_len, "encoding": "int8 levels x 2**exponent (format 4)"}
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
        int8 = SketchedWeight(sketch.codes, round_int8_tables(sketch.values), sketch.bits,
                              sketch.in_features)
        losses[name] = {
            "recorded": config["layer_losses"][name],
            "recomputed": float(weighted_error(dense[name], sketch.dequantize(),
                                               hessians[name], damp).sum()),
            "int8": float(weighted_error(dense[name], int8.dequantize(), hessians[name],
                                         damp).sum()),
        }
    write_json_atomic(cache, {"key": key, "losses": losses})
    return losses


@functools.cache
def dense_projections(source: str) -> dict[str, torch.Tensor]:
    """The source's projection weights in fp32, loaded once for all the int8 folders."""
    model, _ = load_dense(SOURCES[source])
    return {n: m.weight.detach().float() for n, m in projection_names(model).items()}


def int8_folder(bits: int, gpr: int, args: argparse.Namespace) -> Path:
    """`<keep>/sketch<bits>-gpr<gpr>-int8`: the kept folder with its tables int8-encoded and its
    recorded losses raised by what the rounding adds (`int8_losses`), made once."""
    source = kept_folder(Row("sketch", "gridfree", bits, gpr), args)
    folder = source.with_name(f"{source.name}-int8")
    fingerprint = json.loads((source / "config.json").read_text())["quantization_config"][
        "fingerprint"]
    if (folder / "config.json").is_file() and sketch_config_of(folder).fingerprint == fingerprint:
        return folder
    measured = int8_losses(source, dense_projections("gridfree"), args)
    model = load(source, values_dtype=torch.float32, serve=False)
    for layer in sketched_layers(model).values():
        layer.values.data = round_int8_tables(layer.values.data)
    quant = format_of(model)
    quant.table_encoding = "int8"
    quant.layer_losses = {name: entry["recorded"] + entry["int8"] - entry["recomputed"]
                          for name, entry in measured.items()}
    save_sketched(model, AutoTokenizer.from_pretrained(source), folder, force=True)
    return folder


def mixed_candidates(args: argparse.Namespace, output: Path) -> list[tuple[int, int]]:
    """The (bits, gpr) sketch folders finished and kept for the rows in `output`."""
    done = finished_rows(output)
    return [(b, gpr) for b, gpr in MIXED_CANDIDATES
            if Row("sketch", "gridfree", b, gpr).key in done
            and (kept_folder(Row("sketch", "gridfree", b, gpr), args) / "config.json").is_file()]


def run_mixed_row(row: Row, args: argparse.Namespace) -> dict | None:
    """`sketchtune mix` at the budget over the kept 3- and 4-bit folders, bf16 and int8
    (`int8_folder`), measured as every row; its bits per weight sum each projection's count."""
    present = mixed_candidates(args, Path(args.output))
    missing = [f"sketch{b}-gpr{g}" for b, g in MIXED_CANDIDATES if (b, g) not in present]
    if not present or (missing and not args.mixed_partial):
        print(f"{row.key}: skipped, waiting for {', '.join(missing)}", flush=True)
        return None
    start = time.perf_counter()
    folders = []
    for b, gpr in present:
        folders += [kept_folder(Row("sketch", row.source, b, gpr), args),
                    int8_folder(b, gpr, args)]
    candidates = [open_candidate(f) for f in folders]
    budget = mixed_budget(row)
    try:
        plan = plan_mix(candidates, budget)
    except SketchtuneError as err:  # only with --mixed-partial: the folders there cost too much
        print(f"{row.key}: skipped, {err}", flush=True)
        return None
    model = mix(plan)
    for layer in sketched_layers(model).values():  # fp32 tables, as the other sketch rows run
        layer.values.data = layer.values.data.float()
    tokenizer = AutoTokenizer.from_pretrained(folders[0])
    seconds = time.perf_counter() - start
    ppl = heldout_perplexity(model, tokenizer, args.heldout, args.seq_len, progress=False)
    checks = [e["recomputed"] / e["recorded"]
              for f in folders if not f.name.endswith("-int8")
              for e in json.loads(f.with_name(f"{f.name}.int8-losses.json").read_text())[
                  "losses"].values() if e["recorded"] > 0]
    allocation = plan.allocation
    return {
        **asdict(row), "key": row.key, "bits_per_weight": plan.bits_per_weight,
        "perplexity": ppl["perplexity"], "nll_per_token": ppl["nll_per_token"],
        "compress_seconds": round(seconds, 1),  # int8 folders (unless made), allocation, build
        "loss_sum": allocation.loss,
        "budget_of": Row("gptq", row.source, row.bits, row.group).key,
        "budget_bits_per_weight": budget,
        "candidates": [f.name for f in folders],
        "missing_candidates": missing,
        "allocation": plan.summary()["modules_from"],
        "choices": {name: folders[i].name for name, i in plan.choice.items()},
        "lagrange_multiplier": allocation.lam,
        "lagrangian_loss_sum": allocation.lagrangian_loss,
        "lagrangian_bits_per_weight": allocation.lagrangian_bits / plan.weights,
        "loss_lower_bound": allocation.lower_bound,
        "recomputed_over_recorded_loss": [min(checks), max(checks)],
        "note": "sketchtune mix over the kept folders; layers from separate sequential "
                "(error-compensated) runs: a mixed model's later blocks were compensated for "
                "slightly different earlier errors; int8 folders' losses = recorded loss + "
                "(int8 - bf16) Hessian-weighted error, Hessians recomputed through each "
                "folder's own sketched model",
    }


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
