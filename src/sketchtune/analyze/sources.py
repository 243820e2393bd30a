"""Where the analysis gets its inputs: the base model and codes, the update ΔW, the Hessians.

The subject is a dense model (the weights ΔW is measured from; it also runs for the Hessians and the
short fine-tune) plus the codes of its sketch: a sketched folder's own codes (data-aware, as
compressed), or for a dense model plain per-(row, group) k-means codes learned here.
"""

from __future__ import annotations

import os
import random
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from .. import hub
from ..compression import find_decoder_blocks, sketchable_names
from ..errors import SketchtuneError
from ..export import densify
from ..format import dequantize
from ..hessian import InputHessian
from ..learn import learn_sketch
from ..sources import load_dense
from ..task_sketch import META_NAME, load_task_sketch, sketched_layers

DeltaOf = Callable[[str], torch.Tensor]  # layer name -> ΔW (d_out, d_in) fp32


@dataclass
class Subject:
    model: PreTrainedModel  # dense, fp32, eval mode
    tokenizer: PreTrainedTokenizerBase
    layers: list[str]  # sketched projections, names relative to the model
    bits: int
    gpr: int
    codes_origin: str  # said in the report
    codes: dict[str, torch.Tensor] | None = None  # unpacked (d_out, d_in); None: plain k-means
    values: dict[str, torch.Tensor] | None = None  # the sketched base's tables
    fingerprint: str | None = None
    reconstructed: bool = False  # dense weights are the sketch's reconstruction, not a real base

    def codes_for(self, name: str, rows: torch.Tensor) -> torch.Tensor:
        """Codes of the given rows of one layer (learned from the dense weight when not stored)."""
        if self.codes is not None:
            return self.codes[name][rows]
        weight = self.model.get_submodule(name).weight.detach()[rows]
        return learn_sketch(weight, None, self.bits, self.gpr)[0]


def load_subject(
    model: str, base: str | None = None, bits: int | None = None, gpr: int | None = None
) -> Subject:
    """A sketched folder (its codes; dense weights from `base`, else its reconstruction) or a dense
    model (plain k-means codes at `bits`, `gpr`, default 4 and 4)."""
    if Path(model).is_dir() and hub.sketch_config_of(model) is not None:
        return _sketched_subject(model, base, bits, gpr)
    if base is not None:
        raise SketchtuneError("--base is for a sketched MODEL; a dense MODEL is its own base")
    dense, tokenizer = load_dense(model)
    bits, gpr = bits or 4, gpr or 4
    blocks_name, blocks = find_decoder_blocks(dense)
    layers = [
        f"{blocks_name}.{i}.{name}"
        for i, block in enumerate(blocks)
        for name in sorted(sketchable_names(block, gpr, bits))
    ]
    if not layers:
        raise SketchtuneError(f"{model} has no projection a {bits}-bit gpr={gpr} sketch fits")
    origin = f"plain per-(row, group) k-means of {model} (no calibration)"
    return Subject(dense.float(), tokenizer, layers, bits, gpr, origin)


def _sketched_subject(path: str, base: str | None, bits: int | None, gpr: int | None) -> Subject:
    sketched = hub.load(path)
    quant = hub.format_of(sketched)
    stored = (quant.bits, quant.groups_per_row)
    if (bits or stored[0], gpr or stored[1]) != stored:
        raise SketchtuneError(
            f"{path} is a {stored[0]}-bit gpr={stored[1]} sketch: "
            "leave --bits/--gpr out or match them"
        )
    layers = sketched_layers(sketched)
    codes = {name: layer.sketch().unpacked_codes() for name, layer in layers.items()}
    values = {name: layer.values.detach().clone() for name, layer in layers.items()}
    fingerprint = hub.fingerprint_of(sketched)
    if base is None:
        dense, tokenizer = densify(sketched, torch.float32), AutoTokenizer.from_pretrained(path)
    else:
        dense, tokenizer = load_dense(base)
        _check_same_layers(dense.float(), codes, base)
    learning = quant.learning
    kind = "data-aware" if learning.get("data_aware", True) else "plain k-means"
    return Subject(
        dense.float(), tokenizer, list(layers), *stored, f"the {kind} sketch {path}", codes,
        values, fingerprint, reconstructed=base is None,
    )


def _check_same_layers(dense: nn.Module, codes: dict[str, torch.Tensor], base: str) -> None:
    for name, layer_codes in codes.items():
        try:
            weight = dense.get_submodule(name).weight
        except AttributeError:
            raise SketchtuneError(f"base {base} has no layer {name}") from None
        if weight.shape != layer_codes.shape:
            raise SketchtuneError(
                f"base {base}: {name} is {tuple(weight.shape)}, the sketch has "
                f"{tuple(layer_codes.shape)}"
            )


# The update ΔW


def delta_source(subject: Subject, path: str | os.PathLike) -> tuple[DeltaOf, str]:
    """ΔW from a task sketch folder (minus its sketched base) or a dense tuned model (minus the
    dense base); returns it per layer and a description."""
    if (Path(path) / META_NAME).is_file():
        return _task_sketch_delta(subject, path), f"task sketch {path} minus its sketched base"
    if subject.reconstructed:
        raise SketchtuneError(
            "a dense tuned model needs --base (the dense model it was tuned from): the sketch's "
            "reconstruction would count the compression error as part of the update"
        )
    tuned, _ = load_dense(os.fspath(path))
    tuned = tuned.float()

    def delta_of(name: str) -> torch.Tensor:
        try:
            new = tuned.get_submodule(name).weight.detach()
        except AttributeError:
            raise SketchtuneError(f"{path} has no layer {name}") from None
        old = subject.model.get_submodule(name).weight.detach()
        if new.shape != old.shape:
            raise SketchtuneError(f"{path}: {name} is {tuple(new.shape)}, base {tuple(old.shape)}")
        return new - old

    return delta_of, f"dense model {path} minus its dense base"


def _task_sketch_delta(subject: Subject, path: str | os.PathLike) -> DeltaOf:
    """ΔW = dequant(codes, tuned values) - dequant(codes, base values): frozen codes fit it."""
    if subject.codes is None or subject.values is None:
        raise SketchtuneError("a task sketch needs its sketched base as MODEL")
    sketch = load_task_sketch(path)
    if sketch.base_fingerprint != subject.fingerprint:
        raise SketchtuneError(
            f"task sketch {path} was made for base {sketch.base_fingerprint}, "
            f"MODEL is {subject.fingerprint}"
        )
    if set(sketch.values) != set(subject.layers):
        raise SketchtuneError(f"task sketch {path} does not cover the layers of MODEL")

    def delta_of(name: str) -> torch.Tensor:
        codes = subject.codes[name]
        return dequantize(codes, sketch.values[name]) - dequantize(codes, subject.values[name])

    return delta_of


@dataclass
class FinetuneSettings:
    steps: int = 20
    lr: float = 5e-5
    batch_size: int = 4
    seq_len: int = 128
    seed: int = 0


def short_finetune(
    subject: Subject, data: str, settings: FinetuneSettings, data_root: str | None = None,
    progress: bool = True,
) -> tuple[DeltaOf, dict]:
    """Full fine-tune of every sketched projection of the dense model through `train`'s loop
    (AdamW at a constant rate, loss on responses, no clipping); ΔW is what the steps changed.
    The model's weights are restored afterwards."""
    from ..data.tasks import load_examples
    from ..data.tokens import tokenize_examples
    from ..train import FinetuneConfig, LeanLossTrainer, train_model

    examples, _ = load_examples(data, "train", data_root)
    wanted = settings.steps * settings.batch_size * 4  # spare for examples over seq_len
    examples = random.Random(settings.seed).sample(examples, min(len(examples), wanted))
    dataset, _ = tokenize_examples(examples, subject.tokenizer, settings.seq_len)
    if len(dataset) == 0:
        raise SketchtuneError(f"no {data} example fits in {settings.seq_len} tokens")
    config = FinetuneConfig(
        max_steps=settings.steps, lr=settings.lr, batch_size=settings.batch_size,
        seq_len=settings.seq_len, seed=settings.seed, warmup=0, lr_schedule="constant",
        max_grad_norm=0.0, logging_steps=1, checkpoints=False, bf16=False,
        gradient_checkpointing="off",
    )
    model = subject.model
    weights = [model.get_submodule(name).weight for name in subject.layers]
    start_weights = [w.detach().clone() for w in weights]
    model.requires_grad_(False)
    for w in weights:
        w.requires_grad_(True)
    with tempfile.TemporaryDirectory(prefix="sketchtune-analyze-") as run_dir:
        trainer, _, seconds = train_model(model, subject.tokenizer, dataset, config,
                                          Path(run_dir), LeanLossTrainer, progress=progress)
    losses = [round(log["loss"], 4) for log in trainer.state.log_history if "loss" in log]
    model.eval().requires_grad_(False)
    deltas = {}
    with torch.no_grad():
        for name, w, w0 in zip(subject.layers, weights, start_weights, strict=True):
            deltas[name] = w.detach() - w0
            w.copy_(w0)
    info = {
        "data": data, "examples": len(dataset), **vars(settings), "losses": losses,
        "seconds": round(seconds, 1),
    }
    return deltas.__getitem__, info


# Input Hessians


def collect_hessians(
    model: nn.Module, layers: list[str], windows: torch.Tensor, batch_size: int = 4
) -> dict[str, torch.Tensor]:
    """H = 2/n Σ x xᵀ of every layer's inputs over the token windows (n, seq_len), fp32.

    Projections fed the same tensor (q, k, v; gate, up) share one Hessian object.
    """
    sums: dict[str, InputHessian] = {}
    owner: dict[str, str] = {}  # layer -> layer whose Hessian it shares
    last: list = [None, ""]  # the input tensor seen last and the layer that owns its Hessian

    def hook(name: str):
        def accumulate(_module, args):
            x = args[0]
            if x is last[0]:
                owner[name] = last[1]
                return
            last[0], last[1] = x, name
            owner[name] = name
            if name not in sums:
                sums[name] = InputHessian(x.shape[-1])
            sums[name].add(x)

        return accumulate

    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in layers]
    try:
        with torch.no_grad():
            for batch in windows.split(batch_size):
                model.base_model(input_ids=batch, use_cache=False)  # no LM head needed
    finally:
        for handle in handles:
            handle.remove()
    hessians = {name: h.finish() for name, h in sums.items()}
    return {name: hessians[owner[name]] for name in layers}
