"""Log-likelihood scoring: multiple choice (lm-evaluation-harness style) and response NLL.

Both score token continuations after a context. Rows are sorted by length, left-padded and run in
batches; since every continuation then ends at the last column, the model computes logits for the
last few positions only (`logits_to_keep`), not for the whole context.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from ..data.tasks import IGNORE_INDEX, Example, tokenize_examples
from ..errors import SketchtuneError
from .options import Choices

TokenPair = tuple[list[int], list[int]]  # (context ids, continuation ids)


@torch.no_grad()
def score_continuations(
    model: nn.Module,
    pairs: Sequence[TokenPair],
    pad_id: int,
    batch_size: int = 16,
    progress: bool = True,
    desc: str = "loglik",
) -> list[tuple[float, int]]:
    """(sum of log p(continuation tokens | context), token count) for each pair, in input order.

    Every context must hold at least one token (the first continuation token needs a prediction).
    """
    if any(not context for context, _ in pairs):
        raise ValueError("every context needs at least one token")
    device = next(model.parameters()).device
    order = sorted(range(len(pairs)), key=lambda i: -sum(map(len, pairs[i])))
    scores: list[tuple[float, int]] = [(0.0, 0)] * len(pairs)
    was_training = model.training
    model.eval()
    try:
        for start in tqdm(
            range(0, len(order), batch_size), desc=desc, unit="batch", disable=not progress
        ):
            rows = order[start : start + batch_size]
            batch = [pairs[i] for i in rows]
            for i, score in zip(rows, _score_batch(model, batch, pad_id, device), strict=True):
                scores[i] = score
    finally:
        model.train(was_training)
    return scores


def _score_batch(
    model: nn.Module, batch: list[TokenPair], pad_id: int, device: torch.device
) -> list[tuple[float, int]]:
    ids = [context + continuation for context, continuation in batch]
    width = max(map(len, ids))
    keep = max(len(continuation) for _, continuation in batch)
    input_ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in ids], device=device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in ids], device=device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(
        input_ids=input_ids, attention_mask=mask, position_ids=positions,
        logits_to_keep=keep + 1, use_cache=False,
    ).logits[:, -(keep + 1) : -1]  # (b, keep, V): predictions of the last `keep` tokens
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    targets = input_ids[:, width - keep :]  # (b, keep)
    picked = logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (b, keep)
    lengths = torch.tensor([len(c) for _, c in batch], device=device)
    scored = torch.arange(keep, device=device) >= keep - lengths.unsqueeze(1)  # (b, keep)
    sums = (picked * scored).sum(-1)
    return [(s, n) for s, n in zip(sums.tolist(), lengths.tolist(), strict=True)]


def encode_pairs(
    tokenizer: PreTrainedTokenizerBase, pairs: Sequence[tuple[str, str]]
) -> list[TokenPair]:
    """Text pairs -> token pairs, as lm-evaluation-harness splits them: the whole text is encoded
    once and the continuation is what follows the context's own token count, so a token that
    spans the boundary is never split; trailing context spaces move to the continuation."""
    moved = []
    for context, continuation in pairs:
        stripped = context.rstrip(" ")
        moved.append((stripped, context[len(stripped) :] + continuation))
    wholes = tokenizer([c + r for c, r in moved])["input_ids"]
    contexts = tokenizer([c for c, _ in moved])["input_ids"]
    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else _pad_id(tokenizer)
    encoded = []
    for whole, context in zip(wholes, contexts, strict=True):
        n = len(context)
        encoded.append((whole[:n] or [prefix], whole[n:]))
    return encoded


def choice_accuracy(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    items: Sequence[Choices],
    batch_size: int = 16,
    progress: bool = True,
) -> dict:
    """Accuracy of picking the option of highest log-likelihood ("correct") and of highest
    log-likelihood per character of the option text ("correct_norm", lm-eval's acc_norm)."""
    texts = [pair for item in items for pair in zip(item.contexts, item.continuations, strict=True)]
    scores = score_continuations(
        model, encode_pairs(tokenizer, texts), _pad_id(tokenizer), batch_size, progress
    )
    correct = correct_norm = 0
    at = 0
    for item in items:
        sums = [s for s, _ in scores[at : at + len(item.continuations)]]
        at += len(item.continuations)
        normed = [s / max(len(r), 1) for s, r in zip(sums, item.continuations, strict=True)]
        correct += _argmax(sums) == item.gold
        correct_norm += _argmax(normed) == item.gold
    return {"n": len(items), "correct": correct, "correct_norm": correct_norm}


def response_nll(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    batch_size: int = 8,
    max_len: int = 2048,
    progress: bool = True,
) -> dict:
    """Mean NLL per response token of each example's `output` (+ EOS) after its LLM-Adapters
    prompt, tokenized exactly as fine-tuning tokenizes it: the held-out loss.

    Returns {"nll", "nll_se" (standard error, items as clusters), "tokens", "n", "too_long"}.
    """
    dataset, report = tokenize_examples(list(examples), tokenizer, max_len)
    pairs = []
    for ids, labels in zip(dataset["input_ids"], dataset["labels"], strict=True):
        split = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
        pairs.append((ids[:split], ids[split:]))
    if not pairs:
        raise SketchtuneError(f"no example fits in {max_len} tokens")
    scores = score_continuations(
        model, pairs, _pad_id(tokenizer), batch_size, progress, desc="response nll"
    )
    losses = [-s for s, _ in scores]
    counts = [n for _, n in scores]
    tokens = sum(counts)
    nll = sum(losses) / tokens
    return {
        "nll": nll,
        "nll_se": _ratio_se(losses, counts, nll),
        "tokens": tokens,
        "n": len(pairs),
        "too_long": report["too long"],
    }


def _ratio_se(losses: list[float], counts: list[int], mean: float) -> float | None:
    """Standard error of sum(losses) / sum(counts) with items as independent clusters."""
    n = len(losses)
    if n < 2:
        return None
    spread = sum((loss - mean * c) ** 2 for loss, c in zip(losses, counts, strict=True))
    return math.sqrt(spread * n / (n - 1)) / sum(counts)


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)


def _pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise SketchtuneError("the tokenizer has neither a pad nor an EOS token to pad with")
    return pad
