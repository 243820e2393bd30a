"""One record of a data file -> an `Example`, or the reason it cannot be used.

Two shapes: LLM-Adapters / user records (`instruction`/`output`, optional `input` and `answer`,
or `prompt`/`completion`) and GSM8K's (`question`, `answer` = worked solution ending "#### N").
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_CALCULATOR = re.compile(r"<<[^<>]*>>")  # GSM8K calculator annotations: "<<48/2=24>>"


@dataclass
class Example:
    """One instruction example."""

    instruction: str
    input: str  # may be ""
    output: str  # the target response text
    answer: str  # gold label ("answer1", "true", "18", "B", ...); "" for free text


def instruction_record(record: object) -> Example | str:
    """An LLM-Adapters or user record (`None`: a .jsonl line that is not JSON)."""
    if record is None:
        return "invalid JSON"
    if not isinstance(record, dict):
        return "missing field"
    fields = ("instruction", "output") if "instruction" in record else ("prompt", "completion")
    instruction, output = (_text(record.get(f)) for f in fields)
    if instruction is None or output is None:
        return "missing field"
    return Example(
        instruction, _text(record.get("input")) or "", output, _text(record.get("answer")) or ""
    )


def _text(value: object) -> str | None:
    """A field as text: strings as they are, numbers written out, anything else None."""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return None


def gsm8k_record(record: object) -> Example | str:
    """GSM8K `answer` = worked solution ending "#### N" -> "<solution>\\nThe answer is N."."""
    if record is None:
        return "invalid JSON"
    question = _text(record.get("question")) if isinstance(record, dict) else None
    solution = _text(record.get("answer")) if isinstance(record, dict) else None
    if question is None or solution is None or "####" not in solution:
        return "missing field"
    rationale, _, final = solution.rpartition("####")
    answer = final.strip().replace(",", "")  # "1,080" -> "1080"
    rationale = _CALCULATOR.sub("", rationale).strip()
    if not answer or not rationale:
        return "empty text"
    return Example(question, "", f"{rationale}\nThe answer is {answer}.", answer)
