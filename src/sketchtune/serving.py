"""Inference-only changes to a loaded model: nothing here is meant to be trained."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel


def bf16_embeddings(model: PreTrainedModel) -> PreTrainedModel:
    """Keep the input embedding and the output head (tied or not) in bf16, with fp32 activations
    around them: half their bytes read per decoded token, and the head is a large share of a small
    model's (SmolLM2-135M: 28M of its 135M weights). Sketched folders store them in bf16, so the
    weights are exact; the head's input is rounded to bf16, which moves logits slightly."""
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    compute = embedding.weight.dtype
    for module in (embedding, head):
        if module is not None and module.weight.dtype != torch.bfloat16:
            module.weight.data = module.weight.data.bfloat16()  # tied: one shared parameter
    embedding.register_forward_hook(lambda _m, _args, out: out.to(compute))
    if head is not None:
        head.register_forward_pre_hook(lambda _m, args: (args[0].bfloat16(), *args[1:]))
        head.register_forward_hook(lambda _m, _args, out: out.to(compute))
    return model
