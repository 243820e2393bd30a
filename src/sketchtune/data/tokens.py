"""Examples as training tokens: tokenising with the loss on the response only, and batching."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from ..errors import SketchtuneError
from .records import Example
from .templates import format_prompt

if TYPE_CHECKING:
    import datasets
    from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100  # label of tokens that carry no loss (the prompt, the padding)


def tokenize_examples(
    examples: list[Example], tokenizer: PreTrainedTokenizerBase, max_len: int
) -> tuple[datasets.Dataset, dict]:
    """Token ids for causal-LM training with the loss on the response only.

    input_ids = prompt ids (with the tokenizer's special tokens, e.g. BOS) + response ids + EOS;
    labels = IGNORE_INDEX on the prompt, the ids on response + EOS. Prompt and response are
    tokenized apart so the boundary is exact. Examples over `max_len` tokens are skipped.
    """
    import datasets  # the train extra

    if max_len < 1:
        raise SketchtuneError(f"max_len must be >= 1, got {max_len}")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise SketchtuneError("the tokenizer has no EOS token: responses could not end")
    columns: dict[str, list[list[int]]] = {"input_ids": [], "attention_mask": [], "labels": []}
    if examples:
        prompts = tokenizer([format_prompt(e.instruction, e.input) for e in examples])["input_ids"]
        responses = tokenizer([e.output for e in examples], add_special_tokens=False)["input_ids"]
    else:
        prompts = responses = []
    for prompt, response in zip(prompts, responses, strict=True):
        if prompt and prompt[-1] == eos:
            prompt = prompt[:-1]  # tokenizers that append EOS to every text
        response = [*response, eos]
        ids = prompt + response
        if len(ids) > max_len:
            continue
        columns["input_ids"].append(ids)
        columns["attention_mask"].append([1] * len(ids))
        columns["labels"].append([IGNORE_INDEX] * len(prompt) + response)
    report = {"too long": len(examples) - len(columns["input_ids"])}  # merges into load reports
    return datasets.Dataset.from_dict(columns), report


def collate(
    tokenizer: PreTrainedTokenizerBase,
) -> Callable[[list[dict]], dict[str, torch.Tensor]]:
    """A collate function: right-pads input_ids (`pad_id`), attention_mask (0), labels."""
    fills = {"input_ids": pad_id(tokenizer), "attention_mask": 0, "labels": IGNORE_INDEX}

    def collate_batch(features: list[dict]) -> dict[str, torch.Tensor]:
        rows = {key: [_as_list(f[key]) for f in features] for key in fills}
        width = max(len(r) for r in rows["input_ids"])
        return {  # each (batch, width), long
            key: torch.tensor([r + [fill] * (width - len(r)) for r in rows[key]], dtype=torch.long)
            for key, fill in fills.items()
        }

    return collate_batch


def pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id to pad with: the pad token, else EOS (a pad id of 0 is an id, not a missing one)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise SketchtuneError("the tokenizer has neither a pad nor an EOS token to pad with")
    return pad


def _as_list(ids) -> list[int]:
    return ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
