"""Export a sketched model (optionally with a task sketch applied) as a plain dense model."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedModel

from .atomic import atomic_directory
from .layers import sketched_layers


def densify(model: PreTrainedModel, dtype: torch.dtype = torch.bfloat16) -> PreTrainedModel:
    """Replace every SketchLinear by an nn.Linear holding its reconstructed weight, in place."""
    for name, layer in sketched_layers(model).items():
        dense = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                          device="meta")
        dense.weight = nn.Parameter(layer.dequantized_weight().to(dtype), requires_grad=False)
        if layer.bias is not None:
            dense.bias = nn.Parameter(layer.bias.detach().to(dtype), requires_grad=False)
        model.set_submodule(name, dense)
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)  # a plain model again: .to(dtype)
    elif hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model.to(dtype)


def export_dense(
    model: PreTrainedModel, tokenizer, path: str | os.PathLike, force: bool = False,
    dtype: torch.dtype = torch.bfloat16,
) -> Path:
    """Write a standard transformers folder that any runtime can load without sketchtune."""
    densify(model, dtype)
    with atomic_directory(path, force) as temp:
        model.save_pretrained(temp)
        if tokenizer is not None:
            tokenizer.save_pretrained(temp)
    return Path(path)
