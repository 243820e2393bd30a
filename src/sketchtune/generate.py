"""Text generation through transformers' `generate` (greedy by default)."""

from __future__ import annotations

from typing import Any

import torch
from transformers import CompileConfig, PreTrainedModel, PreTrainedTokenizerBase

from .data.tokens import pad_id

STATIC_CACHE_MIN = 256  # positions: the smallest static KV cache a compiled decode uses


def decode_options(compile: bool, total_tokens: int) -> dict[str, Any]:
    """`generate` keyword arguments for a decode of `total_tokens` (prompt + new); with
    `compile`, a static KV cache and a torch.compile'd decode step on any device (transformers
    compiles by itself only on accelerators).

    The cache is sized to the next power of two (at least STATIC_CACHE_MIN), so later calls of
    other lengths within it reuse the compiled step instead of compiling again (a decode step
    reads its whole static cache, so it is not sized larger). Compiling takes about a minute for
    a small model on this 2-core machine and gains ~15% per token (README): it pays off for long
    generations, not for one short reply, so it stays opt-in.
    """
    if not compile:
        return {}
    config = CompileConfig()
    config._compile_all_devices = True  # transformers' documented switch for CPU compilation
    size = max(STATIC_CACHE_MIN, 1 << max(0, total_tokens - 1).bit_length())
    return {"cache_implementation": "static", "compile_config": config, "max_cache_len": size}


def generate_text(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    max_new_tokens: int = 64,
    chat: bool = False,
    compile: bool = False,
) -> str:
    """Greedy continuation of `prompt`; with `chat`, the prompt goes through the chat template;
    with `compile`, see `decode_options`."""
    if chat and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    else:
        text = prompt
    inputs = tokenizer(text, return_tensors="pt")
    total = inputs["input_ids"].shape[1] + max_new_tokens
    with torch.no_grad():
        out = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad_id(tokenizer),
            **decode_options(compile, total),
        )
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
