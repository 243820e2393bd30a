"""Batched generation of replies to LLM-Adapters prompts (greedy, or beam search)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..data.records import Example
from ..data.templates import format_prompt
from ..data.tokens import pad_id


@torch.no_grad()
def generate_replies(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    max_new_tokens: int,
    batch_size: int = 8,
    num_beams: int = 1,
    progress: bool = True,
) -> list[str]:
    """The reply to each example's prompt, in input order, special tokens removed.

    Prompts are sorted by length and left-padded, so each batch holds prompts of similar length.
    Generation is deterministic: greedy, or beam search when `num_beams` > 1.
    """
    eos, pad = tokenizer.eos_token_id, pad_id(tokenizer)
    prompts = tokenizer([format_prompt(e.instruction, e.input) for e in examples])["input_ids"]
    prompts = [p[:-1] if len(p) > 1 and p[-1] == eos else p for p in prompts]  # no EOS in prompts
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    device = next(model.parameters()).device
    replies = [""] * len(prompts)
    was_training = model.training
    model.eval()
    try:
        for start in tqdm(
            range(0, len(order), batch_size), desc="generate", unit="batch", disable=not progress
        ):
            rows = order[start : start + batch_size]
            width = max(len(prompts[i]) for i in rows)
            ids = [[pad] * (width - len(prompts[i])) + prompts[i] for i in rows]
            mask = [[0] * (width - len(prompts[i])) + [1] * len(prompts[i]) for i in rows]
            out = model.generate(
                input_ids=torch.tensor(ids, device=device),
                attention_mask=torch.tensor(mask, device=device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                num_beams=num_beams,
                pad_token_id=pad,
                eos_token_id=eos,
            )
            texts = tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
            for i, text in zip(rows, texts, strict=True):
                replies[i] = text.strip()
    finally:
        model.train(was_training)
    return replies
