"""Causal-LM cross-entropy without the full logits: the output head runs on chunks of positions.

`model(input_ids, labels=labels).loss` materialises fp32 logits for every position over the whole
vocabulary (SmolLM2 at 8 x 256: 2048 x 49152 floats, 400 MB, plus as much again for the softmax
and for its gradient). Here the model runs with `logits_to_keep=1`, the backbone's last hidden
states are taken from a hook, and the head + cross-entropy run over chunks of the positions that
have a label, each chunk's gradient taken in the same pass, so only one chunk's logits ever exist.
The result is transformers' `ForCausalLMLoss`: labels shifted left, -100 ignored, the sum over
tokens divided by `num_items_in_batch` when given (HF Trainer's count over the accumulated
batch, which keeps gradient accumulation exact), else by the number of counted tokens.
"""

from __future__ import annotations

import inspect
import weakref

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100
CHUNK_BYTES = 32 << 20  # fp32 logits of one chunk: 170 positions at a 49k vocabulary
CHECK_VOCAB = 256  # logits compared with the model's own to find heads that are not linear

_transformed_heads: weakref.WeakSet[nn.Module] = weakref.WeakSet()  # models whose logits != head(h)


def causal_lm_loss(
    model: nn.Module,
    inputs: dict[str, torch.Tensor],
    num_items_in_batch: torch.Tensor | int | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Next-token cross-entropy of `model` on `inputs` (input_ids, attention_mask, labels).

    `model` may be wrapped (DDP, PEFT): it is called as it is, so wrappers do their part.
    Models whose head is not a plain linear layer (logit soft-capping, scaling) get the plain
    loss; that is found by comparing the logits the model kept with our own, then remembered.
    """
    lm = _causal_lm(model)
    if not _chunkable(lm):
        return _plain_loss(model, inputs, num_items_in_batch)
    head = lm.get_output_embeddings()
    hidden, kept = _hidden_states(model, lm.get_decoder(), inputs)  # (batch, seq, hidden)
    if not _head_is_linear(kept, hidden[:, -1:], head):
        _transformed_heads.add(lm)
        return _plain_loss(model, inputs, num_items_in_batch)
    labels = inputs["labels"].to(hidden.device)
    shifted = F.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:].flatten()  # (batch * seq,)
    counted = shifted.ne(IGNORE_INDEX)
    rows = hidden.flatten(0, 1)[counted]  # (tokens, hidden): only positions with a label
    chunk = chunk_size or max(1, CHUNK_BYTES // (4 * head.out_features))
    total = LinearCrossEntropy.apply(rows, head.weight, head.bias, shifted[counted], chunk,
                                     torch.is_grad_enabled())
    if num_items_in_batch is None:
        return total / counted.sum()
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


class LinearCrossEntropy(torch.autograd.Function):
    """Σ_i CE(rows_i · weightᵀ + bias, targets_i), `chunk` rows at a time.

    The gradients are computed in the forward, chunk by chunk (softmax minus one-hot, times the
    head), and only scaled by the incoming gradient in the backward: each chunk's logits are
    freed before the next is made, and the head runs once per chunk, not twice. `track`: whether
    to take gradients at all (grad mode where it was called).
    """

    @staticmethod
    def forward(ctx, rows, weight, bias, targets, chunk, track):
        # needs_input_grad says True under no_grad too: `track` (grad mode at the call) decides
        need_rows, need_weight, need_bias = (track and n for n in ctx.needs_input_grad[:3])
        total = torch.zeros((), dtype=torch.float32, device=rows.device)
        grad_rows = torch.empty_like(rows) if need_rows else None  # (tokens, hidden)
        grad_weight = torch.zeros_like(weight) if need_weight else None  # (vocab, hidden)
        grad_bias = torch.zeros_like(bias) if need_bias else None  # (vocab,)
        compute = _compute_dtype(rows)  # cast once, not in every chunk's matmuls
        weight_c, bias_c = weight.to(compute), None if bias is None else bias.to(compute)
        for start in range(0, rows.shape[0], chunk):
            part, target = rows[start:start + chunk], targets[start:start + chunk]
            logits = F.linear(part, weight_c, bias_c).float()  # (chunk, vocab)
            lse = logits.logsumexp(-1)
            total += (lse - logits.gather(1, target[:, None])[:, 0]).sum()
            if not (need_rows or need_weight or need_bias):
                continue
            dlogits = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
            dlogits[torch.arange(len(target), device=target.device), target] -= 1
            if need_rows:
                grad_rows[start:start + chunk] = dlogits @ weight_c
            if need_weight:
                grad_weight += dlogits.T @ part
            if need_bias:
                grad_bias += dlogits.sum(0)
        ctx.save_for_backward(grad_rows, grad_weight, grad_bias)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grads = [None if g is None else g * grad_total.to(g.dtype) for g in ctx.saved_tensors]
        return *grads, None, None, None


def _compute_dtype(rows: torch.Tensor) -> torch.dtype:
    """The dtype the head's matmuls run in: autocast's where it is on, else the activations'
    (a served head keeps a bf16 weight for fp32 activations: `serving.bf16_embeddings`)."""
    device = rows.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else rows.dtype


def _causal_lm(model: nn.Module) -> nn.Module:
    """The transformers model inside DDP/FSDP/compile wrappers and PEFT."""
    from accelerate.utils import extract_model_from_parallel

    model = extract_model_from_parallel(model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _chunkable(lm: nn.Module) -> bool:
    return (
        lm not in _transformed_heads
        and hasattr(lm, "get_decoder")
        and isinstance(lm.get_output_embeddings(), nn.Linear)
        and "logits_to_keep" in inspect.signature(lm.forward).parameters
    )


def _hidden_states(model: nn.Module, decoder: nn.Module, inputs: dict[str, torch.Tensor]):
    """(the backbone's last hidden states, the logits the model kept for the last position)."""
    captured = []
    hook = decoder.register_forward_hook(lambda _m, _args, out: captured.append(out[0]))
    try:
        out = model(**{k: v for k, v in inputs.items() if k != "labels"}, logits_to_keep=1)
    finally:
        hook.remove()
    return captured[-1], out.logits


def _head_is_linear(kept: torch.Tensor, last: torch.Tensor, head: nn.Linear) -> bool:
    """Whether the logits the model kept for the last position are `head(last)`, checked on the
    first CHECK_VOCAB entries (a soft-cap or scale changes all of them; the whole head would
    cost a cast of its weight under autocast). Tolerance: two roundings in the logits' dtype.
    Non-finite logits (a diverged step) compare equal where both are NaN, so the loss comes out
    non-finite for the trainer to stop on, and the head is not marked as transformed."""
    n = min(CHECK_VOCAB, head.out_features)
    with torch.no_grad():
        bias = None if head.bias is None else head.bias[:n].to(last.dtype)
        ours = F.linear(last, head.weight[:n].to(last.dtype), bias)
    kept = kept[..., :n]
    if kept.shape != ours.shape:
        return False
    tol = max(1e-5, 2 * torch.finfo(kept.dtype).eps)
    kept, ours = kept.float(), ours.float()
    scale = kept.abs().nan_to_num(nan=0.0, posinf=0.0).max().item()
    return torch.allclose(kept, ours, rtol=tol, atol=tol * scale, equal_nan=True)


def _plain_loss(model, inputs, num_items_in_batch) -> torch.Tensor:
    extra = {} if num_items_in_batch is None else {"num_items_in_batch": num_items_in_batch}
    return model(**inputs, **extra).loss
