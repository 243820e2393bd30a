"""Data files: where the shared folder is, how a .json/.jsonl file is read, what is kept.

The files are read with `json` rather than `datasets.load_dataset`, whose schema inference fails
on a whole file for one record of the wrong type. Records that cannot be used are counted in
the report, never fatal.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path

from ..errors import SketchtuneError
from .records import Example

SKIP_REASONS = ("missing field", "empty text", "duplicate", "invalid JSON")

_REPO_ROOT = Path(__file__).resolve().parents[3]


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


def question_key(instruction: str, input: str) -> str:
    """A question as compared for duplicates and test overlap: lowercased, whitespace collapsed."""
    return " ".join(f"{instruction} {input}".lower().split())


class Tally:
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
        key = (question_key(example.instruction, example.input), example.output.strip())
        if key in self._seen:
            return "duplicate"
        self._seen.add(key)
        return ""

    def report(self, source: str, kept: int) -> dict:
        return {"source": source, "records": self.records, "kept": kept, "skipped": self.skipped}


def load_file(
    path: Path, parse: Callable[[object], Example | str], dedupe: bool
) -> tuple[list[Example], dict]:
    """The usable examples of one file (`parse`: one record -> example or skip reason)."""
    tally = Tally(dedupe)
    examples = tally.keep(parse(r) for r in read_records(path))
    return examples, tally.report(str(path), len(examples))


def read_records(path: Path) -> list:
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
