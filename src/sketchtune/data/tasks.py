"""Task datasets for fine-tuning and evaluation, in the LLM-Adapters instruction format.

Sources, all local files:
- `commonsense`: the training mix of the LLM-Adapters protocol, rebuilt from olmo's train
  splits (`olmo_files`).
- the shared data folder (`files.find_data_root`): `llm-adapters/<task>/{train,test}.json` and
  `gsm8k/{train,test}.jsonl`.
- a user `.json` (list) or `.jsonl` file of `instruction`/`output` (optional `input`, `answer`)
  or `prompt`/`completion` records.

Tokenising and batching are in `tokens`, the test-overlap check in `overlap`.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import SketchtuneError
from .files import find_data_root, load_file, read_records
from .olmo_files import load_commonsense, load_olmo
from .records import Example, instruction_record
from .registry import COMMONSENSE, MIX, TASKS, Task, find_task
from .templates import format_prompt
from .text import read_text_file

SPLITS = ("train", "test")
CALIB_HELP = ("calibration text: a file (.txt; .json/.jsonl of 'text' records), or training "
              "examples as fine-tuning reads them: a task or the commonsense mix by name, or a "
              ".json/.jsonl instruction file (default: the shipped Wikipedia passages)")


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
        return load_file(Path(spec).expanduser(), instruction_record, dedupe)
    name = _canonical_name(spec, data_root)
    if name == MIX:
        if split != "train":
            raise SketchtuneError(
                f"{MIX} is a training mix: evaluate on its tasks ({', '.join(COMMONSENSE)})"
            )
        return load_commonsense()
    task = find_task(name) or Task(name, "")  # an unregistered llm-adapters folder
    if not task.files:
        return load_olmo(task.name, split)
    relative = task.files.format(name=task.name, split=split)
    path = _shared_file(task, relative, split, data_root)
    if path is not None:
        return load_file(path, task.read, dedupe)
    if split == "train" and task.olmo:  # piqa, social_i_qa, winogrande
        return load_olmo(task.name, split)
    raise SketchtuneError(f"{name} has no {split} split (no {relative})")


def example_texts(examples: list[Example]) -> list[str]:
    """Examples as the text fine-tuning reads: the prompt, then the response."""
    return [format_prompt(e.instruction, e.input) + e.output for e in examples]


def calibration_source(spec: str, data_root: str | None = None) -> list[str]:
    """Calibration texts: a text file (`text.read_text_file`), or a task, the training mix or an
    instruction file (`load_examples`), whose training examples are calibrated on as
    fine-tuning will read them."""
    if _looks_like_path(spec) and not _instruction_file(Path(spec).expanduser()):
        return read_text_file(spec)
    texts = example_texts(load_examples(spec, "train", data_root)[0])
    if not texts:  # never fall back to the shipped text unasked
        raise SketchtuneError(f"{spec}: no training examples to calibrate on")
    return texts


_INSTRUCTION_KEYS = ({"instruction", "output"}, {"prompt", "completion"})  # records.py's two forms


def _instruction_file(path: Path) -> bool:
    """Whether a .json/.jsonl file holds instruction records rather than "text" ones (its first
    record decides)."""
    if path.suffix.lower() not in (".json", ".jsonl") or not path.is_file():
        return False
    first = next((r for r in read_records(path) if r is not None), None)
    return isinstance(first, dict) and any(keys <= first.keys() for keys in _INSTRUCTION_KEYS)


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
