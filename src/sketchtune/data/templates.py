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
    return _choose(f"solution to the question: {goal}", "solution", solutions, between="\n\n")


def question_answers(question: str, answers: list[str]) -> str:
    """ARC-Easy, ARC-Challenge, OpenBookQA and Social IQa (3 to 5 answers)."""
    return _choose(f"answer to the question: {question}", "answer", answers)


def hellaswag(context: str, endings: list[str]) -> str:
    return _choose(f"ending to complete the given sentence: {context}", "ending", endings)


def winogrande(sentence: str, options: list[str]) -> str:
    # LLM-Adapters puts a space, not a blank line, before "Answer format" here.
    request = f"answer to fill in the blank to complete the given sentence: {sentence}"
    return _choose(request, "option", options, before_format=" ")


def _choose(
    request: str, word: str, items: list[str], between: str = " ", before_format: str = "\n\n"
) -> str:
    """ "Please choose the correct <request>\n\n<Word>1: .. <Word>2: ..\n\nAnswer format:
    <word>1/<word>2", the layout every multiple-choice task shares."""
    listed = between.join(f"{word.capitalize()}{i}: {x}" for i, x in enumerate(items, 1))
    return (
        f"Please choose the correct {request}\n\n{listed}"
        f"{before_format}Answer format: {_labels(word, len(items))}"
    )


def _labels(word: str, n: int) -> str:
    return "/".join(f"{word}{i}" for i in range(1, n + 1))
