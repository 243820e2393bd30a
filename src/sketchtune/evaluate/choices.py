"""Answer extraction for the LLM-Adapters generation protocol: a reply -> the model's answer.

Each registered task names its rule (`data.registry`); files get one inferred from their labels.
- "choice" (commonsense): the FIRST match in the reply of the task's label pattern (`true|false`,
  `solution1|solution2`, `answer1..answerN`, `ending1..4`, `option1|option2`), case-sensitive as
  in LLM-Adapters, compared exactly with the gold label;
- "number" (math, numeric files): the LAST number in the reply, commas removed, correct within
  1e-3 of the gold number;
- "letter" (AQuA, files whose labels are letters): after the last "answer" cue (any case), the first
  standalone capital A-E ("(D)", "D", "D."); without a cue, or none after it, the last standalone
  A-E in the reply. LLM-Adapters takes the first capital A-E anywhere, which the "A:" that opens
  many replies (or any word like "Alice") would hit first.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from ..data.registry import BOOL_LABELS, find_task
from ..errors import SketchtuneError

TOLERANCE = 1e-3

_NUMBER = re.compile(r"-?\d+\.?\d*")
_CUE = re.compile(r"answer", re.IGNORECASE)
_LETTER = re.compile(r"\b([A-E])\b")
_LABEL = re.compile(r"([a-z]+)\d")


@dataclass(frozen=True)
class AnswerRule:
    """How one task's replies are scored: kind "choice" (with its regex), "number" or "letter"."""

    kind: str
    pattern: str = ""

    def extract(self, reply: str) -> str | float | None:
        """The answer found in `reply`, or None."""
        if self.kind == "choice":
            found = re.search(self.pattern, reply)
            return found.group(0) if found else None
        if self.kind == "number":
            numbers = _NUMBER.findall(reply.replace(",", ""))
            return float(numbers[-1]) if numbers else None
        return _letter(reply)

    def is_correct(self, reply: str, gold: str) -> bool:
        answer = self.extract(reply)
        if answer is None:
            return False
        if self.kind == "number":
            return abs(answer - _as_number(gold)) <= TOLERANCE
        return answer == gold.strip()


def rule_for(task: str, golds: Sequence[str] = ()) -> AnswerRule:
    """The rule of a named task; for other files, inferred from their gold labels."""
    known = find_task(task)
    if known is not None:
        return AnswerRule(known.answer, known.labels)
    labels = {g.strip() for g in golds}
    if not labels or "" in labels:
        raise SketchtuneError(f"{task}: every item needs a gold `answer` to score replies")
    if all(_is_number(g) for g in labels):
        return AnswerRule("number")
    if labels <= set("ABCDE"):
        return AnswerRule("letter")
    if labels <= {"true", "false"}:
        return AnswerRule("choice", BOOL_LABELS)
    words = {m.group(1) if (m := _LABEL.fullmatch(g)) else None for g in labels}
    if len(words) == 1 and None not in words:
        return AnswerRule("choice", rf"{words.pop()}\d")
    example = sorted(labels)[0]
    raise SketchtuneError(f"{task}: cannot tell how to score answers like {example!r}")


def _letter(reply: str) -> str | None:
    cues = list(_CUE.finditer(reply))
    if cues:
        after = _LETTER.search(reply, cues[-1].end())
        if after:
            return after.group(1)
    letters = _LETTER.findall(reply)
    return letters[-1] if letters else None


def _as_number(text: str) -> float:
    return float(text.strip().replace(",", ""))


def _is_number(text: str) -> bool:
    try:
        _as_number(text)
    except ValueError:
        return False
    return True
