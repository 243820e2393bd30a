"""Log-likelihood scoring: multiple choice (lm-evaluation-harness style) and response NLL.

Both score token continuations after a context. Rows are sorted by length, left-padded and run in
batches; since every continuation then ends at the last column, the model computes logits for the
last few positions only (`logits_to_keep`), not for the whole context.

With `share_contexts` (multiple choice), pairs whose context ids are identical run that context
once: one row holds the context and then all its continuations, a 4-D attention mask keeps each
continuation to the context and itself, and each continuation's position ids follow on from the
context's, so every score equals the plain path's (to float rounding). Pairs with a context of
their own, and models whose attention takes no custom 4-D mask, take the plain path.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from ..data.records import Example
from ..data.tokens import IGNORE_INDEX, pad_id, tokenize_examples
from ..errors import SketchtuneError
from .options import Choices

TokenPair = tuple[list[int], list[int]]  # (context ids, continuation ids)
PACKABLE = ("sdpa", "eager")  # attention implementations that take a custom 4-D mask
Scorer = Callable[[nn.Module, list[TokenPair], int, torch.device], list[tuple[float, int]]]


@torch.no_grad()
def score_continuations(
    model: nn.Module,
    pairs: Sequence[TokenPair],
    pad_id: int,
    batch_size: int = 16,
    progress: bool = True,
    desc: str = "loglik",
    share_contexts: bool = False,
) -> list[tuple[float, int]]:
    """(sum of log p(continuation tokens | context), token count) for each pair, in input order.

    Every context must hold at least one token (the first continuation token needs a prediction).
    `share_contexts` runs a context shared by several pairs once per batch (same scores, less work).
    """
    if any(not context for context, _ in pairs):
        raise ValueError("every context needs at least one token")
    device = next(model.parameters()).device
    share_contexts = share_contexts and _attention(model) in PACKABLE
    scores: list[tuple[float, int]] = [(0.0, 0)] * len(pairs)
    was_training = model.training
    model.eval()
    try:
        for rows, scorer in tqdm(
            _plan(pairs, batch_size, share_contexts), desc=desc, unit="batch", disable=not progress
        ):
            batch = [pairs[i] for i in rows]
            for i, score in zip(rows, scorer(model, batch, pad_id, device), strict=True):
                scores[i] = score
    finally:
        model.train(was_training)
    return scores


def _plan(
    pairs: Sequence[TokenPair], batch_size: int, share_contexts: bool
) -> list[tuple[list[int], Scorer]]:
    """Batches of at most `batch_size` pair indices, each with its scorer, longest first. A shared
    context's pairs stay in one batch unless they outnumber `batch_size`."""
    groups: dict[tuple[int, ...], list[int]] = {}  # without sharing, each pair is its own group
    for i, (context, _) in enumerate(pairs):
        groups.setdefault(tuple(context) if share_contexts else (i,), []).append(i)
    packed: list[list[int]] = []
    for group in sorted(
        (g for g in groups.values() if len(g) > 1),
        key=lambda g: -len(pairs[g[0]][0]) - sum(len(pairs[i][1]) for i in g),  # row length
    ):
        for start in range(0, len(group), batch_size):
            chunk = group[start : start + batch_size]
            if packed and len(packed[-1]) + len(chunk) <= batch_size:
                packed[-1] += chunk
            else:
                packed.append(chunk)
    alone = sorted(
        (g[0] for g in groups.values() if len(g) == 1), key=lambda i: -sum(map(len, pairs[i]))
    )
    return [(rows, _score_packed) for rows in packed] + [
        (alone[start : start + batch_size], _score_batch)
        for start in range(0, len(alone), batch_size)
    ]


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


def _score_packed(
    model: nn.Module, batch: list[TokenPair], pad_id: int, device: torch.device
) -> list[tuple[float, int]]:
    """Pairs of a shared context as one row: context, then each continuation, each continuation
    attending to the context and to itself only (a 4-D mask) and positioned right after the
    context. Rows are left-padded, so the scored tokens lie in the last `keep` columns."""
    rows: dict[tuple[int, ...], list[int]] = {}  # context -> its pairs in the batch
    for i, (context, _) in enumerate(batch):
        rows.setdefault(tuple(context), []).append(i)
    width = max(len(c) + sum(len(batch[i][1]) for i in pairs) for c, pairs in rows.items())
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    positions = torch.zeros_like(ids)
    segment = torch.full_like(ids, -1)  # -1 padding, 0 context, j + 1 the row's j-th continuation
    row_of, column, target, pair_of = [], [], [], []  # one entry per scored token
    for r, (context, pairs) in enumerate(rows.items()):
        at = width - len(context) - sum(len(batch[i][1]) for i in pairs)
        ids[r, at : at + len(context)] = torch.tensor(context)
        positions[r, at : at + len(context)] = torch.arange(len(context))
        segment[r, at : at + len(context)] = 0
        last = at + len(context) - 1  # predicts every continuation's first token
        at = last + 1
        for j, i in enumerate(pairs):
            continuation = batch[i][1]
            n = len(continuation)
            ids[r, at : at + n] = torch.tensor(continuation, dtype=torch.long)
            positions[r, at : at + n] = torch.arange(len(context), len(context) + n)
            segment[r, at : at + n] = j + 1
            column += [last, *range(at, at + n - 1)][:n]  # where each token is predicted
            row_of += [r] * n
            target += continuation
            pair_of += [i] * n
            at += n
    keep = width - min(column, default=width - 1)
    index = torch.arange(width)
    allowed = (
        (segment.unsqueeze(1) == 0) | (segment.unsqueeze(1) == segment.unsqueeze(2))
    ) & (segment.unsqueeze(1) >= 0) & (index <= index.unsqueeze(1))  # (rows, query, key)
    allowed |= torch.eye(width, dtype=torch.bool)  # padding attends to itself: no empty row
    logits = model(
        input_ids=ids.to(device), attention_mask=_as_mask(model, allowed.unsqueeze(1).to(device)),
        position_ids=positions.to(device), logits_to_keep=keep, use_cache=False,
    ).logits  # (rows, keep, V): the last `keep` columns
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    row_t, column_t, target_t, pair_t = (
        torch.tensor(x, dtype=torch.long, device=device) for x in (row_of, column, target, pair_of)
    )
    picked = logprobs[row_t, column_t - (width - keep), target_t]
    sums = torch.zeros(len(batch), device=device).index_add_(0, pair_t, picked)
    return [(s, len(c)) for s, (_, c) in zip(sums.tolist(), batch, strict=True)]


def _as_mask(model: nn.Module, allowed: torch.Tensor) -> torch.Tensor:
    """A boolean attend-mask as the attention implementation takes a custom 4-D mask: sdpa as is,
    eager as an additive float mask."""
    if _attention(model) == "sdpa":
        return allowed
    dtype = model.get_input_embeddings().weight.dtype
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
        ~allowed, torch.finfo(dtype).min
    )


def _attention(model: nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "_attn_implementation", None)


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
    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else pad_id(tokenizer)
    encoded = []
    for whole, context in zip(wholes, contexts, strict=True):
        n = len(context)
        encoded.append((whole[:n] or [prefix], whole[n:]))
    return encoded


TARGET_DELIMITER = " "  # lm-eval's default: what each option's continuation starts with


def option_logliks(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    items: Sequence[Choices],
    batch_size: int = 16,
    progress: bool = True,
    share_contexts: bool = True,
) -> list[list[float]]:
    """log p(option | context) of every option of every item, item by item.
    `share_contexts` runs an item's context once for all its options (same scores, less work)."""
    texts = [pair for item in items for pair in zip(item.contexts, item.continuations, strict=True)]
    scores = score_continuations(
        model, encode_pairs(tokenizer, texts), pad_id(tokenizer), batch_size, progress,
        share_contexts=share_contexts,
    )
    sums, at = [], 0
    for item in items:
        sums.append([s for s, _ in scores[at : at + len(item.continuations)]])
        at += len(item.continuations)
    return sums


def choice_picks(item: Choices, logliks: Sequence[float]) -> tuple[int, int]:
    """The option of highest log-likelihood, and of highest log-likelihood per character of the
    option text without the leading delimiter: lm-eval's acc_norm divides by len(choice), the
    choice as its doc_to_choice gives it, in characters (its bytes-based rule is acc_bytes)."""
    normed = [
        s / max(len(r.removeprefix(TARGET_DELIMITER)), 1)
        for s, r in zip(logliks, item.continuations, strict=True)
    ]
    return _argmax(list(logliks)), _argmax(normed)


def choice_accuracy(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    items: Sequence[Choices],
    batch_size: int = 16,
    progress: bool = True,
    share_contexts: bool = True,
) -> dict:
    """How often the `choice_picks` of each item are its gold option: "correct" (lm-eval's acc)
    and "correct_norm" (lm-eval's acc_norm); "per_item" holds both as 0/1 lists, item by item."""
    logliks = option_logliks(model, tokenizer, items, batch_size, progress, share_contexts)
    hits, hits_norm = [], []
    for item, sums in zip(items, logliks, strict=True):
        pick, pick_norm = choice_picks(item, sums)
        hits.append(int(pick == item.gold))
        hits_norm.append(int(pick_norm == item.gold))
    return {"n": len(items), "correct": sum(hits), "correct_norm": sum(hits_norm),
            "per_item": {"correct": hits, "correct_norm": hits_norm}}


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

    Returns {"nll", "nll_se" (standard error, items as clusters), "tokens", "n", "too_long",
    "per_item": {"loss": summed NLL of each item's response, "tokens": its token count}}.
    """
    dataset, report = tokenize_examples(list(examples), tokenizer, max_len)
    pairs = []
    for ids, labels in zip(dataset["input_ids"], dataset["labels"], strict=True):
        split = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
        pairs.append((ids[:split], ids[split:]))
    if not pairs:
        raise SketchtuneError(f"no example fits in {max_len} tokens")
    scores = score_continuations(
        model, pairs, pad_id(tokenizer), batch_size, progress, desc="response nll"
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
        "per_item": {"loss": losses, "tokens": counts},
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
