"""Sketched models on disk: a Hugging Face folder whose safetensors hold `P.codes` + `P.values`.

config.json carries `quantization_config`, a `format.SketchFormatConfig`. Folders are written as
transformers writes large models (`model.safetensors`, or shards of at most `max_shard_size` plus
`model.safetensors.index.json`) and read by transformers' own `from_pretrained` through
sketchtune's quantizer (`hf_quantizer`), so the dense model is never materialised.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel

from .atomic import atomic_directory
from .compression import STORAGE_DTYPE
from .errors import SketchtuneError, corrupt_checkpoint
from .format import (
    EXPONENT_SUFFIX,
    QUANT_METHOD,
    FormatError,
    SketchFormatConfig,
    encode_int8_tables,
    round_int8_tables,
)
from .layers import base_fingerprint, sketched_layers

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_SIZE = "5GB"


def sketch_config_of(path: str | os.PathLike) -> SketchFormatConfig | None:
    """The folder's validated sketch config, or None for a dense model folder."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise SketchtuneError(f"{path} is not a model folder (no config.json)")
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise SketchtuneError(f"{config_file} is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise SketchtuneError(f"{config_file} is not a JSON object")
    quant = config.get("quantization_config")
    if isinstance(quant, dict) and not isinstance(quant.get("quant_method"), str):
        raise FormatError(f"{config_file}: quantization_config has no quant_method name")
    if isinstance(quant, dict) and quant.get("quant_method") != QUANT_METHOD:
        return None
    if quant is None:
        return None
    sketch = SketchFormatConfig.from_dict(quant)
    check_architecture(config, config_file)
    return sketch


def check_architecture(config: dict, config_file: Path) -> None:
    """The folder must name an architecture this transformers has. One that exists only as code
    shipped with the folder (`auto_map`) is refused: sketchtune never sets trust_remote_code."""
    from transformers import CONFIG_MAPPING

    model_type = config.get("model_type")
    if isinstance(model_type, str) and model_type in CONFIG_MAPPING:
        return
    if "auto_map" in config:
        raise SketchtuneError(
            f"{config_file}: model_type {model_type!r} needs code from the folder (auto_map); "
            "sketchtune never runs it (no trust_remote_code)"
        )
    raise SketchtuneError(f"{config_file}: unknown model_type {model_type!r} for this transformers")


def format_of(model: nn.Module) -> SketchFormatConfig:
    """The sketch config a (sketched) model carries in memory."""
    quant = getattr(getattr(model, "config", None), "quantization_config", None)
    if isinstance(quant, SketchFormatConfig):
        return quant
    if isinstance(quant, dict) and quant.get("quant_method") == QUANT_METHOD:
        return SketchFormatConfig.from_dict(quant)
    raise SketchtuneError("model is not sketched (run compress first)")


def fingerprint_of(model: nn.Module) -> str:
    return format_of(model).fingerprint or base_fingerprint(model)


def unique_state(model: nn.Module) -> dict[str, torch.Tensor]:
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


def write_safetensors(
    state: dict[str, torch.Tensor], folder: Path, max_shard_size: int | str
) -> list[Path]:
    """`model.safetensors`, or shards + index when the state exceeds `max_shard_size`."""
    split = split_torch_state_dict_into_shards(state, max_shard_size=max_shard_size)
    metadata = {"format": "pt", "producer": QUANT_METHOD}
    files = []
    for filename, names in split.filename_to_tensors.items():
        save_file({name: state[name] for name in names}, folder / filename, metadata=metadata)
        files.append(folder / filename)
    if split.is_sharded:
        index = {"metadata": {"total_size": sum(f.stat().st_size for f in files)},
                 "weight_map": split.tensor_to_filename}
        (folder / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True))
    return files


def checkpoint_files(path: str | os.PathLike) -> list[Path]:
    """The safetensors files of a folder, single-file or sharded."""
    folder = Path(path)
    index = folder / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            return [folder / name for name in sorted(set(weight_map.values()))]
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise SketchtuneError(f"corrupt checkpoint index {index}: {exc}") from None
    return [folder / WEIGHTS_NAME]


def save_sketched(
    model: PreTrainedModel, tokenizer, path: str | os.PathLike, force: bool = False,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
) -> Path:
    """Write a sketched model as a Hugging Face folder, atomically. Floats are stored in bf16."""
    quant = replace(format_of(model), fingerprint=base_fingerprint(model))
    state = {
        name: (t.to(STORAGE_DTYPE) if t.is_floating_point() else t).contiguous().cpu()
        for name, t in unique_state(model).items()
    }
    quant = encode_tables(state, quant)
    with atomic_directory(path, force) as temp:
        config = model.config.to_dict()
        config["quantization_config"] = quant.to_dict()
        config["dtype"] = "float32"  # from_pretrained's default for the dense parts, as load's
        (temp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(temp)
        if tokenizer is not None:
            tokenizer.save_pretrained(temp)
        write_safetensors(state, temp, max_shard_size)
    model.config.quantization_config = quant
    return Path(path)


def encode_tables(state: dict[str, torch.Tensor], quant: SketchFormatConfig) -> SketchFormatConfig:
    """Int8-encode in place the tables of `state` whose module the config stores so. Tables off
    the int8 grid (values trained since) are all kept as floats, and the config says so: a save
    never rounds them silently."""
    tables = {name: state[f"{name}.values"] for name in quant.modules
              if quant.table_encoding_of(name) == "int8"}
    if not all(torch.equal(round_int8_tables(t), t) for t in tables.values()):
        settings = {name: {k: v for k, v in own.items() if k != "table_encoding"}
                    for name, own in quant.module_settings.items()}
        return replace(quant, table_encoding="float",
                       module_settings={name: own for name, own in settings.items() if own})
    for name, table in tables.items():
        state[f"{name}.values"], state[f"{name}.{EXPONENT_SUFFIX}"] = encode_int8_tables(table)
    return quant


def read_safetensors(file: Path) -> dict[str, torch.Tensor]:
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
    device_map: str | dict | None = None,
) -> PreTrainedModel:
    """Load a sketched model folder through `from_pretrained`. Dense parts come back in `dtype`,
    `values` in `values_dtype` (fp32 for training); None keeps them as stored (bf16: lossless,
    half the table bytes, and the CPU GEMV reads them as they are, which is faster)."""
    path = Path(path)
    if sketch_config_of(path) is None:
        raise SketchtuneError(f"{path} is not a sketched model (no sketchtune quantization_config)")
    for file in checkpoint_files(path):
        if not file.is_file():
            raise SketchtuneError(f"{path} has no {file.name}")
    from .hf_quantizer import register

    register()
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map=device_map)
    except (OSError, ValueError, RuntimeError) as exc:  # transformers' own loading errors
        if isinstance(exc, SketchtuneError):
            raise
        raise corrupt_checkpoint(path, exc) from None
    if values_dtype is not None:
        for layer in sketched_layers(model).values():
            layer.values.data = layer.values.data.to(values_dtype)
    return model
