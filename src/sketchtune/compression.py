"""Model-level compression: calibration inputs -> block-by-block capture -> learn -> swap.

Blocks are found generically (the largest `nn.ModuleList` of identical modules holding
`nn.Linear`s), and so are the sketching steps inside a block: projections that read the same
input tensor (q, k, v; gate, up) form one step and share one Hessian. Each block is fed the
outputs of the already-sketched blocks before it, and each step sees the inputs produced by the
already-sketched steps before it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from .cliargs import option
from .devices import free_bytes, to_device, tree_map
from .errors import SketchtuneError
from .format import (
    SUPPORTED_BITS,
    SUPPORTED_GPR,
    TABLE_ENCODINGS,
    SketchedWeight,
    SketchFormatConfig,
    check_settings,
    check_shape,
    dequantize,
    round_int8_tables,
)
from .hessian import InputHessian, weighted_error
from .layers import SketchLinear
from .learn import learn_sketch

STORAGE_DTYPE = torch.bfloat16
logger = logging.getLogger(__name__)


@dataclass
class SketchConfig:
    """How to learn sketches. `data_aware=False` gives plain per-row k-means (no calibration)."""

    bits: int = option(4, "bits per code: 2**bits values per row group", choices=SUPPORTED_BITS)
    gpr: int = option(4, "groups per row", choices=SUPPORTED_GPR)
    damp: float = option(0.01, "Hessian damping (fraction of its mean diagonal)")
    importance_power: float = 4.0
    act_order: bool = True
    column_batch: int = 128  # GPTQ's lazy-update width, in columns (a block is a decoder block)
    kmeans: Literal["exact", "lloyd"] = option("exact", "1-D k-means: exact (DP) or Lloyd")
    data_aware: bool = option(True, "plain per-row k-means, no calibration", flag="plain")
    table_encoding: str = option(
        "float", "how tables are stored: float (bf16) or int8 (levels times a power of two per "
        "table: 8 + 8/2**bits bits per entry instead of 16)", choices=TABLE_ENCODINGS,
    )

    def __post_init__(self) -> None:
        check_settings(self.bits, self.gpr)
        if self.table_encoding not in TABLE_ENCODINGS:
            raise SketchtuneError(
                f"table_encoding must be one of {TABLE_ENCODINGS}, got {self.table_encoding!r}"
            )
        if self.kmeans not in ("exact", "lloyd"):
            raise SketchtuneError(f"kmeans must be 'exact' or 'lloyd', got {self.kmeans!r}")
        if not 0 < self.damp < 1:
            raise SketchtuneError(f"damp must be in (0, 1), got {self.damp}")

    def to_dict(self) -> dict:
        return asdict(self)


def find_decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The stack of decoder blocks (dense or sketched): the ModuleList of identical modules with
    the most weights."""
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(m) for m in module}) != 1:
            continue
        if not any(isinstance(m, nn.Linear | SketchLinear) for m in module[0].modules()):
            continue
        size = sum(p.numel() for p in module.parameters())
        if best is None or size > best[0]:
            best = (size, name, module)
    if best is None:
        raise SketchtuneError("model has no decoder blocks with linear projections to sketch")
    return best[1], best[2]


class _StopForward(Exception):
    """Raised inside a hook once the inputs it needs have been seen."""


def _run_block(block: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    out = block(hidden, **kwargs)
    return out[0] if isinstance(out, tuple | list) else out


def _capture_first_block_inputs(
    model: nn.Module, first_block: nn.Module, calibration: torch.Tensor, batch_size: int
) -> list[tuple[torch.Tensor, dict]]:
    """(hidden_states, keyword arguments) of every calibration batch as the first block sees it."""
    captured: list[tuple[torch.Tensor, dict]] = []

    def grab(_module, args, kwargs):
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.append((hidden.detach(), kwargs))
        raise _StopForward

    handle = first_block.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for batch in calibration.split(batch_size):
            try:
                model(input_ids=batch, use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return captured


def _linear_steps(block: nn.Module, hidden: torch.Tensor, kwargs: dict) -> list[list[str]]:
    """Names of the block's nn.Linear modules in call order, grouped by shared input tensor."""
    calls: list[tuple[str, torch.Tensor]] = []
    handles = [
        module.register_forward_pre_hook(lambda _m, args, name=name: calls.append((name, args[0])))
        for name, module in block.named_modules()
        if isinstance(module, nn.Linear)
    ]
    try:
        with torch.no_grad():
            _run_block(block, hidden, kwargs)
    finally:
        for handle in handles:
            handle.remove()
    steps: list[list[str]] = []
    previous_input = None
    for name, inp in calls:
        if steps and inp is previous_input:
            steps[-1].append(name)
        else:
            steps.append([name])
        previous_input = inp
    return steps


def activation_bytes(inputs: list[tuple[torch.Tensor, dict]]) -> int:
    """Bytes the calibration activations need while a block runs: its inputs and its outputs,
    2 x samples x seq_len x hidden x 4 (fp32), plus the per-batch keyword tensors (rotary
    tables, masks)."""
    sizes: list[int] = []
    tree_map(lambda t: sizes.append(t.numel() * t.element_size()), inputs)
    hidden = sum(h.numel() * h.element_size() for h, _ in inputs)
    return sum(sizes) + hidden


def activation_store(
    device: torch.device, inputs: list[tuple[torch.Tensor, dict]], block: nn.Module
) -> torch.device:
    """`device` when the activations fit beside a block in fp32 and its largest Hessian with a
    quarter of the free memory to spare; else the CPU (each batch then visits `device` in turn)."""
    free = free_bytes(device)
    if free is None:
        return device
    weights = sum(p.numel() for p in block.parameters()) * 4
    widest = max((m.in_features for m in block.modules() if isinstance(m, nn.Linear)), default=0)
    need = activation_bytes(inputs) + weights + 4 * widest**2
    return device if need <= 0.75 * free else torch.device("cpu")


def _input_hessian(
    block: nn.Module,
    linear: nn.Linear,
    inputs: list[tuple[torch.Tensor, dict]],
    device: torch.device,
) -> torch.Tensor:
    """H = 2/n Σ x xᵀ over every calibration token reaching `linear` (fp32, (d_in, d_in)), on
    `device`, each calibration batch moved there in turn."""
    hessian = InputHessian(linear.in_features, device)

    def accumulate(_module, args):
        hessian.add(args[0])
        raise _StopForward  # nothing after this projection is needed for its Hessian

    handle = linear.register_forward_pre_hook(accumulate)
    try:
        with torch.no_grad():
            for batch in inputs:
                try:
                    _run_block(block, *to_device(batch, device))
                except _StopForward:
                    pass
    finally:
        handle.remove()
    return hessian.finish()


def _sketch_step(
    block: nn.Module, names: list[str], hessian: torch.Tensor | None, config: SketchConfig
) -> dict[str, float]:
    """Learn one sketch for the stacked rows of projections sharing an input, then swap them in.
    Returns each projection's loss (`LayerSketch.row_loss` summed over its rows), none without a
    Hessian."""
    linears = [block.get_submodule(n) for n in names]
    stacked = torch.cat([lin.weight.detach().float() for lin in linears])  # (Σ d_out, d_in)
    codes, values, row_loss = learn_sketch(
        stacked,
        hessian,
        bits=config.bits,
        gpr=config.gpr,
        damp=config.damp,
        importance_power=config.importance_power,
        act_order=config.act_order,
        column_batch=config.column_batch,
        kmeans=config.kmeans,
    )
    values = values.to(STORAGE_DTYPE).float()  # what is saved is exactly what runs
    if config.table_encoding == "int8":
        rounded = round_int8_tables(values)
        if row_loss is not None:  # the loss the rounding adds, after the codes were chosen
            before = weighted_error(stacked, dequantize(codes, values), hessian, config.damp)
            after = weighted_error(stacked, dequantize(codes, rounded), hessian, config.damp)
            row_loss = row_loss + after - before
        values = rounded
    rows = [lin.out_features for lin in linears]
    for name, lin, c, v in zip(names, linears, codes.split(rows), values.split(rows), strict=True):
        bias = None if lin.bias is None else lin.bias.detach().to(STORAGE_DTYPE).float()
        sketched = SketchLinear.from_sketch(SketchedWeight.from_codes(c, v, config.bits), bias)
        block.set_submodule(name, sketched.to(lin.weight.device))
    if row_loss is None:
        return {}
    return {n: float(loss.sum()) for n, loss in zip(names, row_loss.split(rows), strict=True)}


def sketchable_names(block: nn.Module, gpr: int, bits: int) -> set[str]:
    """Linear projections of a block whose input size the format can represent."""
    names = set()
    for name, module in block.named_modules():
        if isinstance(module, nn.Linear):
            try:
                check_shape(module.in_features, bits, gpr)
            except ValueError:
                continue
            names.add(name)
    return names


def compress_model(
    model: nn.Module,
    calibration: torch.Tensor | None,
    config: SketchConfig,
    batch_size: int = 4,
    progress: bool = True,
    before_block: Callable[[int], None] | None = None,
    device: torch.device | str | None = None,
) -> list[str]:
    """Sketch every linear projection of every decoder block of `model`, in place.

    `device` (default: where the model is) is where each block, its Hessians, Cholesky factors
    and error compensation run, one block at a time; the model stays where it is, and the exact
    k-means runs on CPU threads (numba) wherever `device` is. Calibration activations stay on
    `device` when they fit there, else on the CPU (`activation_store`).

    calibration: (n, seq_len) token ids, required when `config.data_aware`. Returns the sketched
    module names (relative to the model) and records them in `model.config.quantization_config`.
    `before_block(index)` runs just before a block is sketched, after the first block's inputs were
    captured (nothing outside the blocks is used after that): streaming compression
    fills the block's weights from disk there, so the other blocks may still be on meta.
    """
    blocks_name, blocks = find_decoder_blocks(model)
    if config.data_aware and (calibration is None or calibration.numel() == 0):
        raise SketchtuneError("data-aware compression needs calibration text")
    home = next(p.device for p in model.parameters() if not p.is_meta)
    device = home if device is None else torch.device(device)
    sketched: list[str] = []
    left_dense: list[str] = []
    layer_losses: dict[str, float] = {}
    inputs = store = None
    with torch.no_grad():
        if config.data_aware:
            # Embeddings run where the model lives; only the blocks visit `device`.
            inputs = _capture_first_block_inputs(
                model, blocks[0], calibration.to(home), batch_size
            )
            store = activation_store(device, inputs, blocks[0])
            inputs = to_device(inputs, store)
        bar = tqdm(blocks, desc="sketching blocks", unit="block", disable=not progress)
        for index, block in enumerate(bar):
            if before_block is not None:
                before_block(index)
            block.to(device)
            allowed = sketchable_names(block, config.gpr, config.bits)
            left_dense.extend(
                f"{blocks_name}.{index}.{name}" for name, module in block.named_modules()
                if isinstance(module, nn.Linear) and name not in allowed
            )
            if inputs is None:
                steps = [[n] for n in sorted(allowed)]
            else:
                steps = _linear_steps(block, *to_device(inputs[0], device))
            for names in steps:
                names = [n for n in names if n in allowed]
                if not names:
                    continue
                hessian = None
                if inputs is not None:
                    linear = block.get_submodule(names[0])
                    hessian = _input_hessian(block, linear, inputs, device)
                losses = _sketch_step(block, names, hessian, config)
                layer_losses.update({f"{blocks_name}.{index}.{n}": v for n, v in losses.items()})
                sketched.extend(f"{blocks_name}.{index}.{n}" for n in names)
            if inputs is not None and index + 1 < len(blocks):
                inputs = [
                    (to_device(_run_block(block, *to_device((h, kw), device)), store), kw)
                    for h, kw in inputs
                ]
            block.to(home)
    if not sketched:
        raise SketchtuneError(
            "no linear projection in the decoder blocks could be sketched: their input sizes "
            f"are not divisible by gpr={config.gpr} and the {config.bits}-bit packing unit"
        )
    if left_dense:
        logger.warning(
            "%d projections left dense: their input sizes do not fit gpr=%d at %d bits (%s, ...)",
            len(left_dense), config.gpr, config.bits, left_dense[0],
        )
    round_to_storage(model)
    model.config.quantization_config = SketchFormatConfig(
        bits=config.bits,
        groups_per_row=config.gpr,
        modules=sketched,
        storage_dtype=str(STORAGE_DTYPE).removeprefix("torch."),
        dense_projections=left_dense,
        learning=config.to_dict(),
        layer_losses=layer_losses,
        table_encoding=config.table_encoding,
    )
    return sketched


def round_to_storage(model: nn.Module) -> None:
    """Round every floating parameter to the storage dtype, so a reload is bit-identical. In
    slices of 1M entries: a whole-tensor round trip would briefly add 1.5x a 1 GB embedding."""
    with torch.no_grad():
        for param in model.parameters():
            if not param.is_floating_point() or param.dtype == STORAGE_DTYPE:
                continue
            pieces = param.data.view(-1).split(1 << 20) if param.is_contiguous() else [param.data]
            for piece in pieces:
                piece.copy_(piece.to(STORAGE_DTYPE))
