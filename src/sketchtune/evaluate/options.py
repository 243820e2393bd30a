"""Multiple-choice items rebuilt from LLM-Adapters instructions, for log-likelihood scoring.

Each option becomes a (context, continuation) pair, worded as lm-evaluation-harness words the task:
- questions (ARC, OpenBookQA, Social IQa, PIQA, AQuA): "Question: <q>\\nAnswer:" + " <option>";
- BoolQ: "Question: <q>?\\nAnswer:" + " yes" / " no" (labels true / false; LLM-Adapters keeps no
  passage, so neither can we);
- HellaSwag: "<context>" + " <ending>";
- WinoGrande (partial scoring): "<sentence up to _ with the option>" + " <rest of the sentence>".
The option texts come from the instruction: "Answer1: .. Answer2: ..", "Solution1: ..",
"Ending1: ..", "Option1: ..", or AQuA's "Answer Choices: (A) .. (B) ..".
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..data.records import Example

_HEAD = re.compile(r"^Please .*?(?:question|sentence): ", re.DOTALL)
_FORMAT = re.compile(r"\s*Answer format:.*$", re.DOTALL)
_AQUA = re.compile(r"\s*Answer Choices:\s*")
_AQUA_OPTION = re.compile(r"\(([A-E])\)\s*")
_LABEL_NUMBER = re.compile(r"[a-z]+(\d+)")
_MARKERS = ("Answer", "Solution", "Ending", "Option")
_BOOLQ = {"true": " yes", "false": " no"}


@dataclass(frozen=True)
class Choices:
    """One item: a (context, continuation) pair per option and the index of the right one."""

    contexts: tuple[str, ...]
    continuations: tuple[str, ...]
    gold: int


def parse_choices(example: Example) -> Choices:
    """The options of an LLM-Adapters multiple-choice example; ValueError when it has none."""
    text = example.instruction.strip()
    gold = example.answer.strip()
    if "Answer format: true/false" in text:
        question = _question(text).rstrip("?")
        context = f"Question: {question}?\nAnswer:"
        return Choices((context, context), tuple(_BOOLQ.values()), list(_BOOLQ).index(gold))
    if _AQUA.search(text):
        return _aqua(text, gold)
    body = _FORMAT.sub("", text)
    word = next((w for w in _MARKERS if f"{w}1: " in body), None)
    if word is None:
        raise ValueError("no answer options in the instruction")
    question, options = _split_options(body, word)
    number = _LABEL_NUMBER.fullmatch(gold)
    if number is None or not 1 <= int(number.group(1)) <= len(options):
        raise ValueError(f"gold label {gold!r} names no option")
    index = int(number.group(1)) - 1
    if word == "Ending":
        return Choices((question,) * len(options), tuple(f" {o}" for o in options), index)
    if word == "Option":
        return _fill_blank(question, options, index)
    return _question_choices(question, options, index)


def _question(text: str) -> str:
    return _HEAD.sub("", _FORMAT.sub("", text), count=1).strip()


def _split_options(body: str, word: str) -> tuple[str, list[str]]:
    """The text before "<word>1: " (without the fixed task wording) and each option's text."""
    starts, ends, i = [], [], 1
    while (at := _marker(body, f"{word}{i}: ", ends[-1] if ends else 0)) >= 0:
        starts.append(at)
        ends.append(at + len(f"{word}{i}: "))
        i += 1
    options = [body[e:s].strip() for e, s in zip(ends, [*starts[1:], len(body)], strict=True)]
    if len(options) < 2 or not all(options):
        raise ValueError("fewer than two answer options")
    return _question(body[: starts[0]]), options


def _marker(body: str, marker: str, start: int) -> int:
    """Where `marker` starts at a word boundary after `start`; -1 when absent."""
    found = re.compile(rf"(?<!\w){re.escape(marker)}").search(body, start)
    return found.start() if found else -1


def _question_choices(question: str, options: list[str], gold: int) -> Choices:
    context = f"Question: {question}\nAnswer:"
    return Choices((context,) * len(options), tuple(f" {o}" for o in options), gold)


def _fill_blank(sentence: str, options: list[str], gold: int) -> Choices:
    if "_" not in sentence:
        raise ValueError("no blank in the sentence")
    before, _, after = sentence.partition("_")
    contexts = tuple(f"{before}{o}" for o in options)
    return Choices(contexts, (f" {after.strip()}",) * len(options), gold)


def _aqua(text: str, gold: str) -> Choices:
    question, listed = _AQUA.split(text, maxsplit=1)
    parts = _AQUA_OPTION.split(listed)  # ["", "A", "text", "B", "text", ...]
    letters, options = parts[1::2], [p.strip() for p in parts[2::2]]
    if len(options) < 2 or letters != list("ABCDE"[: len(letters)]) or gold not in letters:
        raise ValueError("unreadable answer choices")
    return _question_choices(question.strip(), options, letters.index(gold))
