"""Issue-18 item 4: does `sketchtune eval --protocol loglik` choose what lm-evaluation-harness does?

The ARC-Easy test items that `eval --task arc-easy --protocol loglik --limit N` scores (the
LLM-Adapters file under the shared data folder, the same fixed subset) are written to a JSON-lines
file and handed to lm-eval as a local task with lm-eval's own arc_easy wording: doc_to_text
"Question: {{question}}\\nAnswer:", the choices after a " " delimiter, acc and acc_norm. lm-eval
runs through `HFLM(pretrained=model)` with `log_samples=True`; our evaluation scores the same model
object. For the dense SmolLM2-135M (dequantized Q4_1 GGUF weights) and for a sketch of it (loaded
with `AutoModelForCausalLM.from_pretrained` after `import sketchtune`), it reports both
accuracies from both harnesses, the share of items where both choose the same option (acc and
acc_norm picks), the items whose lm-eval request text differs from ours, and the largest
log-likelihood difference. JSON summary and a per-item CSV go to benchmarks/results/.

    .venv/bin/python benchmarks/lmeval_agreement.py [--limit 500] [--sketched /tmp/smol-sketch]

The sketch: `.venv/bin/sketchtune compress smollm2-135m -o /tmp/smol-sketch --samples 8
--seq-len 256`. Needs `pip install lm-eval` (the `lmeval` extra).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from machine import cpu_model
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

import sketchtune  # noqa: F401  (registers the quantizer that from_pretrained needs)
from sketchtune.atomic import write_json_atomic
from sketchtune.data.tasks import load_examples
from sketchtune.evaluate.loglik import TARGET_DELIMITER, choice_picks, option_logliks
from sketchtune.evaluate.options import Choices, parse_choices
from sketchtune.evaluate.run import fixed_subset
from sketchtune.sources import load_dense

TASK = "sketchtune_arc_easy"
PROMPT = "Question: {{question}}\nAnswer:"  # lm-eval's arc_easy doc_to_text
QUESTION_HEAD, QUESTION_TAIL = "Question: ", "\nAnswer:"


def arc_items(limit: int | None, data_root: str | None = None) -> list[Choices]:
    """The items `eval --task arc-easy --protocol loglik --limit` scores, in the same order."""
    examples, _ = load_examples("ARC-Easy", "test", data_root)
    items = []
    for example in fixed_subset(examples, limit):
        try:
            items.append(parse_choices(example))
        except ValueError:  # `eval` skips these too (its "unparsed" count)
            continue
    return items


def lmeval_docs(items: Sequence[Choices]) -> list[dict]:
    """Our items as arc_easy-shaped docs: the question alone, the choices without the delimiter,
    so that lm-eval builds the request text itself."""
    docs = []
    for i, item in enumerate(items):
        context = item.contexts[0]
        if set(item.contexts) != {context} or not (
            context.startswith(QUESTION_HEAD) and context.endswith(QUESTION_TAIL)
        ):
            raise ValueError(f"item {i} is not a question item: {context!r}")
        if not all(c.startswith(TARGET_DELIMITER) for c in item.continuations):
            raise ValueError(f"item {i} has an option without the leading delimiter")
        docs.append({
            "id": i,
            "question": context[len(QUESTION_HEAD) : -len(QUESTION_TAIL)],
            "choices": [c.removeprefix(TARGET_DELIMITER) for c in item.continuations],
            "gold": item.gold,
        })
    return docs


def task_config(data_file: Path) -> dict:
    """A zero-shot lm-eval multiple-choice task over a local JSON-lines file."""
    return {
        "task": TASK,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data_file)}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": PROMPT,
        "doc_to_choice": "choices",
        "doc_to_target": "gold",
        "target_delimiter": TARGET_DELIMITER,
        "num_fewshot": 0,
        "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}],
    }


def run_lmeval(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    items: Sequence[Choices],
    batch_size: int,
) -> dict:
    """lm-eval on `items`: its accuracies and, per item, its requests and option log-likelihoods."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    with tempfile.TemporaryDirectory() as folder:
        data_file = Path(folder) / "arc_easy_test.jsonl"
        data_file.write_text("".join(json.dumps(d) + "\n" for d in lmeval_docs(items)))
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        out = simple_evaluate(
            model=lm, tasks=[task_config(data_file)], log_samples=True, bootstrap_iters=0
        )
    samples = sorted(out["samples"][TASK], key=lambda s: s["doc"]["id"])
    metrics = out["results"][TASK]
    return {
        "acc": metrics["acc,none"],
        "acc_norm": metrics["acc_norm,none"],
        "arguments": [[tuple(a[:2]) for a in s["arguments"]] for s in samples],
        "logliks": [[float(r[0]) for r in s["filtered_resps"]] for s in samples],
        "sample_acc": [s["acc"] for s in samples],
        "sample_acc_norm": [s["acc_norm"] for s in samples],
    }


def lmeval_picks(choices: Sequence[str], logliks: Sequence[float]) -> tuple[int, int]:
    """lm-eval's pred and pred_norm (api/task.py, process_results): argmax of the log-likelihoods
    and of log-likelihood / len(choice)."""
    lengths = np.array([float(len(c)) for c in choices])
    return int(np.argmax(logliks)), int(np.argmax(np.array(logliks) / lengths))


def compare(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    items: Sequence[Choices],
    batch_size: int = 16,
) -> tuple[dict, list[dict]]:
    """Both harnesses on `items`: a summary and one row per item."""
    start = time.perf_counter()
    ours = option_logliks(model, tokenizer, items, batch_size, progress=False)
    ours_seconds = time.perf_counter() - start
    start = time.perf_counter()
    theirs = run_lmeval(model, tokenizer, items, batch_size)
    theirs_seconds = time.perf_counter() - start
    docs = lmeval_docs(items)
    rows, prompt_mismatches, largest_diff = [], 0, 0.0
    for i, (item, doc) in enumerate(zip(items, docs, strict=True)):
        pick, pick_norm = choice_picks(item, ours[i])
        lm_pick, lm_pick_norm = lmeval_picks(doc["choices"], theirs["logliks"][i])
        if (lm_pick == item.gold) != bool(theirs["sample_acc"][i]) or (
            lm_pick_norm == item.gold
        ) != bool(theirs["sample_acc_norm"][i]):
            raise RuntimeError(f"item {i}: lm-eval's own acc disagrees with its log-likelihoods")
        ours_requests = list(zip(item.contexts, item.continuations, strict=True))
        prompt_mismatches += theirs["arguments"][i] != ours_requests
        diff = max(abs(a - b) for a, b in zip(ours[i], theirs["logliks"][i], strict=True))
        largest_diff = max(largest_diff, diff)
        rows.append({
            "item": i, "gold": item.gold, "options": len(item.continuations),
            "ours_pick": pick, "lmeval_pick": lm_pick,
            "ours_pick_norm": pick_norm, "lmeval_pick_norm": lm_pick_norm,
            "max_abs_loglik_diff": round(diff, 6),
        })
    n = len(rows)
    summary = {
        "n": n,
        "agree_acc": sum(r["ours_pick"] == r["lmeval_pick"] for r in rows) / n,
        "agree_acc_norm": sum(r["ours_pick_norm"] == r["lmeval_pick_norm"] for r in rows) / n,
        "ours_acc": sum(r["ours_pick"] == r["gold"] for r in rows) / n,
        "lmeval_acc": theirs["acc"],
        "ours_acc_norm": sum(r["ours_pick_norm"] == r["gold"] for r in rows) / n,
        "lmeval_acc_norm": theirs["acc_norm"],
        "prompt_mismatches": prompt_mismatches,
        "max_abs_loglik_diff": largest_diff,
        "ours_seconds": round(ours_seconds, 1),
        "lmeval_seconds": round(theirs_seconds, 1),
        "disagreements": [
            r["item"] for r in rows
            if (r["ours_pick"], r["ours_pick_norm"]) != (r["lmeval_pick"], r["lmeval_pick_norm"])
        ],
    }
    return summary, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--sketched", default="/tmp/smol-sketch")
    parser.add_argument("--limit", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--output", default="benchmarks/results/lmeval_agreement")
    args = parser.parse_args()
    import lm_eval

    items = arc_items(args.limit, args.data_root)
    results = {
        "settings": vars(args),
        "cpu": cpu_model(),
        "threads": torch.get_num_threads(),
        "lm_eval": lm_eval.__version__,
        "prompt": "lm-eval arc_easy: 'Question: <q>\\nAnswer:' + ' <choice>' (ours is the same)",
        "systems": {},
    }
    print(f"cpu {results['cpu']}, {results['threads']} threads, lm-eval {lm_eval.__version__}, "
          f"{len(items)} ARC-Easy items")
    loaders = {
        "dense (dequantized Q4_1)": lambda: load_dense(args.model),
        "sketch": lambda: (
            AutoModelForCausalLM.from_pretrained(args.sketched, dtype=torch.float32).eval(),
            AutoTokenizer.from_pretrained(args.sketched),
        ),
    }
    all_rows = []
    for system, load in loaders.items():
        model, tokenizer = load()
        summary, rows = compare(model, tokenizer, items, args.batch_size)
        results["systems"][system] = summary
        all_rows += [{"system": system, **r} for r in rows]
        print(
            f"{system:26s} agree acc {summary['agree_acc']:.3f} acc_norm "
            f"{summary['agree_acc_norm']:.3f} | acc ours {summary['ours_acc']:.3f} lm-eval "
            f"{summary['lmeval_acc']:.3f} | acc_norm ours {summary['ours_acc_norm']:.3f} lm-eval "
            f"{summary['lmeval_acc_norm']:.3f} | prompt mismatches "
            f"{summary['prompt_mismatches']} | max |dll| {summary['max_abs_loglik_diff']:.2e} "
            f"| {summary['ours_seconds']}s ours, {summary['lmeval_seconds']}s lm-eval"
        )
        del model
    write_json_atomic(f"{args.output}.json", results)
    with open(f"{args.output}.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(all_rows[0]))
        writer.writeheader()
        writer.writerows(all_rows)
    print(f"wrote {args.output}.json and {args.output}.csv")


if __name__ == "__main__":
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # the task file is local: no hub look-ups
    main()
