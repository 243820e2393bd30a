"""Prompt templates: the Alpaca / LLM-Adapters instruction prompt and the commonsense task wording.

The task instructions reproduce the wording of the LLM-Adapters commonsense files (commonsense_170k
and the test sets under `shared/data/llm-adapters/`), so a model tuned on a mix rebuilt from other
copies of the same datasets answers in the format the evaluation expects:
`the correct answer is answer2`, `... option1`, `... solution2`, `... ending4`, `... true`.
"""

from __future__ import annotations

_HEAD = "Below is an instruction that describes a task"
_TAIL = "Write a response that appropriately completes the request."


def format_prompt(instruction: str, input: str = "") -> str:
    """The prompt the model sees; the response follows it directly, after "### Response:\\n"."""
    if input:
        return (
            f"{_HEAD}, paired with an input that provides further context. {_TAIL}\n\n"
            f"### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
        )
    return f"{_HEAD}. {_TAIL}\n\n### Instruction:\n{instruction}\n\n### Response:\n"


def answer_output(label: str) -> str:
    """The target response of every commonsense task, e.g. "the correct answer is answer2"."""
    return f"the correct answer is {label}"


def boolq(question: str) -> str:
    return (
        f"Please answer the following question with true or false, question: {question}"
        "\n\nAnswer format: true/false"
    )


def piqa(goal: str, solutions: list[str]) -> str:
    listed = "".join(f"\n\nSolution{i}: {s}" for i, s in enumerate(solutions, 1))
    return (
        f"Please choose the correct solution to the question: {goal}{listed}"
        f"\n\nAnswer format: {_labels('solution', len(solutions))}"
    )


def question_answers(question: str, answers: list[str]) -> str:
    """ARC-Easy, ARC-Challenge, OpenBookQA and Social IQa (3 to 5 answers)."""
    listed = " ".join(f"Answer{i}: {a}" for i, a in enumerate(answers, 1))
    return (
        f"Please choose the correct answer to the question: {question}\n\n{listed}"
        f"\n\nAnswer format: {_labels('answer', len(answers))}"
    )


def hellaswag(context: str, endings: list[str]) -> str:
    listed = " ".join(f"Ending{i}: {e}" for i, e in enumerate(endings, 1))
    return (
        f"Please choose the correct ending to complete the given sentence: {context}\n\n{listed}"
        f"\n\nAnswer format: {_labels('ending', len(endings))}"
    )


def winogrande(sentence: str, options: list[str]) -> str:
    # LLM-Adapters puts a space, not a blank line, before "Answer format" here.
    listed = " ".join(f"Option{i}: {o}" for i, o in enumerate(options, 1))
    return (
        "Please choose the correct answer to fill in the blank to complete the given sentence: "
        f"{sentence}\n\n{listed} Answer format: {_labels('option', len(options))}"
    )


def _labels(word: str, n: int) -> str:
    return "/".join(f"{word}{i}" for i in range(1, n + 1))
