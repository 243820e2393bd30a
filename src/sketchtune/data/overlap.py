"""How many training examples ask a question of one of the shared test sets (contamination)."""

from __future__ import annotations

import functools
from collections import Counter
from pathlib import Path

from .files import find_data_root, load_file, question_key
from .records import Example, instruction_record
from .registry import LLM_ADAPTERS, TASKS


def test_overlap(train: list[Example], data_root: str | None = None) -> dict[str, int]:
    """Per test set under the shared folder, how many training examples ask one of its questions
    (instruction + input, lowercased, whitespace collapsed); test sets with none are left out."""
    index = _test_index(find_data_root(data_root))
    counts: Counter[str] = Counter()
    for example in train:
        counts.update(index.get(question_key(example.instruction, example.input), ()))
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
        for example in load_file(path, parse, dedupe=False)[0]:
            key = question_key(example.instruction, example.input)
            if name not in index.get(key, ()):
                index[key] = (*index.get(key, ()), name)
    return index
