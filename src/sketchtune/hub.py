"""Sketched models on disk: a Hugging Face folder whose safetensors hold `P.codes` + `P.values`.

config.json carries `quantization_config` = {"quant_method": "sketchtune", "bits", "groups_per_row",
"modules", "fingerprint", ...}. Loading builds the model skeleton with parameters on the meta
device, swaps in SketchLinear shells and assigns the stored tensors, so the dense model is never
materialised.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from accelerate import init_empty_weights
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from .atomic import atomic_directory
from .compression import STORAGE_DTYPE, _set_submodule
from .errors import SketchtuneError, corrupt_checkpoint
from .layers import SketchLinear

QUANT_METHOD = "sketchtune"
WEIGHTS_NAME = "model.safetensors"


def base_fingerprint(model: nn.Module) -> str:
    """sha256 over every sketched layer's name and packed codes: identifies a sketched base."""
    digest = hashlib.sha256()
    for name, module in sorted(model.named_modules(), key=lambda item: item[0]):
        if isinstance(module, SketchLinear):
            digest.update(name.encode())
            digest.update(module.codes.contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()[:32]


def sketch_config_of(path: str | os.PathLike) -> dict | None:
    """The folder's sketchtune quantization_config, or None for a dense model folder."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise SketchtuneError(f"{path} is not a model folder (no config.json)")
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SketchtuneError(f"{config_file} is not valid JSON: {exc}") from None
    quant = config.get("quantization_config")
    if isinstance(quant, dict) and quant.get("quant_method") == QUANT_METHOD:
        return quant
    return None


def _unique_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """State dict without tied duplicates (safetensors stores each storage once)."""
    seen: set[int] = set()
    state = {}
    for name, tensor in model.state_dict().items():
        key = tensor.untyped_storage().data_ptr()
        if key in seen:
            continue
        seen.add(key)
        state[name] = tensor
    return state


def save_sketched(
    model: PreTrainedModel, tokenizer, path: str | os.PathLike, force: bool = False
) -> Path:
    """Write a sketched model as a Hugging Face folder, atomically. Floats are stored in bf16."""
    quant = dict(getattr(model.config, "quantization_config", None) or {})
    if quant.get("quant_method") != QUANT_METHOD:
        raise SketchtuneError("model is not sketched (run compress first)")
    quant["fingerprint"] = base_fingerprint(model)
    state = {
        name: (t.to(STORAGE_DTYPE) if t.is_floating_point() else t).contiguous().cpu()
        for name, t in _unique_state(model).items()
    }
    with atomic_directory(path, force) as temp:
        config = model.config.to_dict()
        config["quantization_config"] = quant
        (temp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(temp)
        if tokenizer is not None:
            tokenizer.save_pretrained(temp)
        save_file(state, temp / WEIGHTS_NAME, metadata={"format": "pt", "producer": QUANT_METHOD})
    model.config.quantization_config = quant
    return Path(path)


def _read_safetensors(file: Path) -> dict[str, torch.Tensor]:
    if not file.is_file():
        raise SketchtuneError(f"{file.parent} has no {file.name}")
    try:
        with safe_open(str(file), framework="pt") as handle:
            return {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise corrupt_checkpoint(file, exc) from None


def load(
    path: str | os.PathLike,
    dtype: torch.dtype = torch.float32,
    values_dtype: torch.dtype | None = torch.float32,
) -> PreTrainedModel:
    """Load a sketched model folder. Dense parts come back in `dtype`, `values` in `values_dtype`
    (fp32 for training); None keeps them as stored (bf16: lossless, half the table bytes, and the
    CPU GEMV reads them as they are, which is faster for inference)."""
    path = Path(path)
    quant = sketch_config_of(path)
    if quant is None:
        raise SketchtuneError(f"{path} is not a sketched model (no sketchtune quantization_config)")
    config = AutoConfig.from_pretrained(path)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # ours, not a transformers quantizer
    with init_empty_weights():  # parameters on meta, buffers (rotary tables) real
        model = AutoModelForCausalLM.from_config(config)
    for name in quant["modules"]:
        try:
            dense = model.get_submodule(name)
        except AttributeError:
            raise SketchtuneError(f"sketched module {name} is not part of this model") from None
        shell = SketchLinear(
            dense.in_features, dense.out_features, quant["bits"], quant["groups_per_row"],
            bias=dense.bias is not None, device="meta",
        )
        _set_submodule(model, name, shell)

    stored = _read_safetensors(path / WEIGHTS_NAME)
    expected = model.state_dict()
    tied = {n for n, t in expected.items() if n not in stored and is_tied_output(model, n)}
    missing = sorted(set(expected) - set(stored) - tied)
    unexpected = sorted(set(stored) - set(expected))
    if missing or unexpected:
        raise SketchtuneError(
            f"checkpoint {path / WEIGHTS_NAME} does not match its config: "
            f"missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    for name, tensor in stored.items():
        if tensor.shape != expected[name].shape:
            raise SketchtuneError(
                f"checkpoint tensor {name} has shape {tuple(tensor.shape)}, "
                f"config expects {tuple(expected[name].shape)}"
            )
        if tensor.is_floating_point():
            if name.endswith(".values"):
                stored[name] = tensor if values_dtype is None else tensor.to(values_dtype)
            else:
                stored[name] = tensor.to(dtype)
    model.load_state_dict(stored, strict=False, assign=True)
    model.tie_weights()
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers())
                if t.is_meta]
    if leftover:
        raise SketchtuneError(f"checkpoint {path} leaves {leftover[:3]} unset")
    model.config.quantization_config = quant
    return model.eval()


def is_tied_output(model: PreTrainedModel, name: str) -> bool:
    """True for the output embedding when the config ties it to the input embedding."""
    if not getattr(model.config, "tie_word_embeddings", False):
        return False
    output = model.get_output_embeddings()
    return output is not None and name == _param_name(model, output.weight)


def _param_name(model: nn.Module, param: torch.Tensor) -> str | None:
    for name, candidate in model.named_parameters(remove_duplicate=False):
        if candidate is param:
            return name
    return None
