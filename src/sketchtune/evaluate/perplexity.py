"""Perplexity of a causal LM over fixed-length token windows (see `data.text.token_windows`)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm


@torch.no_grad()
def perplexity(
    model: nn.Module, windows: torch.LongTensor, batch_size: int = 4, progress: bool = True
) -> dict[str, float | int]:
    """exp(mean NLL) of every token after the first in each window, each window read on its own.

    Returns {"perplexity", "nll_per_token", "tokens", "windows", "seq_len"}.
    """
    n, seq_len = windows.shape
    if seq_len < 2:
        raise ValueError("perplexity needs windows of at least 2 tokens")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()  # dropout off; restored below
    total = 0.0
    try:
        for start in tqdm(
            range(0, n, batch_size), desc="perplexity", unit="batch", disable=not progress
        ):
            batch = windows[start : start + batch_size].to(device)  # (b, L)
            logits = model(input_ids=batch, use_cache=False).logits  # (b, L, V)
            # Position t predicts token t + 1; fp32 so bf16 logits do not bias the sum.
            total += F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten(), reduction="sum"
            ).item()
    finally:
        model.train(was_training)
    tokens = n * (seq_len - 1)
    nll = total / tokens
    return {
        "perplexity": math.exp(nll),
        "nll_per_token": nll,
        "tokens": tokens,
        "windows": n,
        "seq_len": seq_len,
    }
