"""Evaluation: answer extraction, option parsing, log-likelihood scoring, generation, evaluate()
and `sketchtune eval`, on hand-written replies and tiny random models."""

import json

import pytest
import torch

from sketchtune.cli import main
from sketchtune.data import templates
from sketchtune.data.files import find_data_root
from sketchtune.data.records import Example
from sketchtune.data.templates import format_prompt
from sketchtune.errors import SketchtuneError
from sketchtune.evaluate import loglik
from sketchtune.evaluate.choices import rule_for
from sketchtune.evaluate.generation import generate_replies
from sketchtune.evaluate.loglik import (
    choice_accuracy,
    choice_picks,
    encode_pairs,
    response_nll,
    score_continuations,
)
from sketchtune.evaluate.options import Choices, parse_choices
from sketchtune.evaluate.run import check_task, evaluate, fixed_subset
from sketchtune.evaluate.stats import wilson_interval
from tests.conftest import char_tokenizer, tiny_model


def _has_shared_data():
    try:
        find_data_root()
    except SketchtuneError:
        return False
    return True


needs_shared = pytest.mark.skipif(not _has_shared_data(), reason="../shared/data not found")


# Answer extraction


@pytest.mark.parametrize(
    "task,reply,gold,ok",
    [
        ("boolq", "the correct answer is true", "true", True),
        ("boolq", "false, not true", "true", False),  # the first match counts
        ("piqa", "solution2 is better than solution1", "solution2", True),
        ("ARC-Easy", "the correct answer is answer4", "answer4", True),
        ("ARC-Easy", "Answer4", "answer4", False),  # case-sensitive, as in LLM-Adapters
        ("social_i_qa", "answer4 then answer2", "answer2", True),  # answer4 is no siqa label
        ("hellaswag", "ending3", "ending3", True),
        ("winogrande", "the correct answer is option1", "option2", False),
        ("winogrande", "no idea", "option2", False),
    ],
)
def test_commonsense_first_label(task, reply, gold, ok):
    assert rule_for(task).is_correct(reply, gold) is ok


@pytest.mark.parametrize(
    "reply,gold,ok",
    [
        ("He has 3 + 4 = 7 apples.\nThe answer is 1,080.", "1080", True),
        ("5 * 3 = 15. The answer is 15.", "15.0", True),
        ("The answer is 15. Then 16 more.", "15", False),  # the last number counts
        ("It drops to -3.5 degrees", "-3.5", True),
        ("about 0.3334", "0.333", True),  # within 1e-3
        ("about 0.335", "0.333", False),
        ("no number at all", "4", False),
    ],
)
def test_math_last_number(reply, gold, ok):
    assert rule_for("gsm8k").is_correct(reply, gold) is ok


@pytest.mark.parametrize(
    "reply,letter",
    [
        ("Rationale: 2 + 2 = 4. The answer is (D).", "D"),
        ("A: Alice buys 3. So the answer is B", "B"),  # "A:" before the cue is ignored
        ("Answer: C. Because E = mc^2", "C"),  # the first letter after the last cue
        ("Between (A) and (C) I pick E", "E"),  # no cue: the last standalone letter
        ("Alice and Bob", None),
    ],
)
def test_aqua_letter(reply, letter):
    assert rule_for("AQuA").extract(reply) == letter


def test_rules_of_other_files_come_from_their_labels():
    assert rule_for("mine.json", ["3", "4.5"]).kind == "number"
    assert rule_for("mine.json", ["A", "C"]).kind == "letter"
    assert rule_for("mine.json", ["true"]).is_correct("true", "true")
    assert rule_for("mine.json", ["answer1", "answer7"]).is_correct("it is answer7", "answer7")
    with pytest.raises(SketchtuneError, match="cannot tell"):
        rule_for("mine.json", ["blue", "red"])


# Confidence interval


def test_wilson_interval_known_values():
    assert wilson_interval(5, 10) == pytest.approx((0.236593, 0.763407), abs=1e-6)
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.277533), abs=1e-6)
    assert wilson_interval(81, 263) == pytest.approx((0.255289, 0.366210), abs=1e-6)
    with pytest.raises(ValueError):
        wilson_interval(0, 0)


# Options for log-likelihood scoring


def _options(instruction, gold):
    return parse_choices(Example(instruction, "", "", gold))


def test_options_from_llm_adapters_instructions():
    arc = _options(templates.question_answers("Why?", ["sun", "rain"]), "answer2")
    assert arc == Choices(("Question: Why?\nAnswer:",) * 2, (" sun", " rain"), 1)

    piqa = _options(templates.piqa("Open a jar", ["twist", "cut"]), "solution1")
    assert piqa.continuations == (" twist", " cut") and piqa.gold == 0

    boolq = _options(templates.boolq("is the sky blue"), "false")
    assert boolq.contexts[0] == "Question: is the sky blue?\nAnswer:" and boolq.gold == 1

    ending = _options(templates.hellaswag("He runs", ["fast.", "home."]), "ending2")
    assert ending == Choices(("He runs", "He runs"), (" fast.", " home."), 1)

    wino = _options(templates.winogrande("Ann beat Bo so _ won.", ["Ann", "Bo"]), "option1")
    assert wino == Choices(("Ann beat Bo so Ann", "Ann beat Bo so Bo"), (" won.", " won."), 0)

    aqua = _options("What is 2+2? Answer Choices: (A) 3 (B) 4 (C) 5 (D) 6 (E) 7", "B")
    assert aqua == Choices(
        ("Question: What is 2+2?\nAnswer:",) * 5, (" 3", " 4", " 5", " 6", " 7"), 1
    )
    with pytest.raises(ValueError):
        _options("What is 2+2?", "4")


# Log-likelihood on a tiny random model

TEXT_PAIRS = [
    ("Question: what is up?\nAnswer:", " the sky"),
    ("Hi", " there you go"),
    ("Question: x\nAnswer: ", "y"),  # the trailing space moves to the continuation
]


def _manual_logprob(model, context_ids, continuation_ids):
    """log p(continuation | context) from one unpadded forward of the whole sequence."""
    ids = torch.tensor([context_ids + continuation_ids])
    logprobs = torch.log_softmax(model(ids).logits[0].double(), dim=-1)
    start = len(context_ids) - 1
    return sum(logprobs[start + j, t].item() for j, t in enumerate(continuation_ids))


def test_loglik_matches_manual_forward_and_batching():
    model, tokenizer = tiny_model(), char_tokenizer()
    pairs = encode_pairs(tokenizer, TEXT_PAIRS)
    assert pairs[2][1] == tokenizer(" y")["input_ids"]
    batched = score_continuations(model, pairs, pad_id=1, batch_size=8, progress=False)
    single = score_continuations(model, pairs, pad_id=1, batch_size=1, progress=False)
    for (context, continuation), (b, nb), (s, ns) in zip(pairs, batched, single, strict=True):
        assert nb == ns == len(continuation)
        assert b == pytest.approx(_manual_logprob(model, context, continuation), abs=1e-4)
        assert b == pytest.approx(s, abs=1e-4)


def test_choice_accuracy_picks_the_likeliest_and_normalises_by_length():
    model, tokenizer = tiny_model(), char_tokenizer()
    item = Choices(("Q: a\nA:",) * 3, (" b", " cd", " efghij"), gold=0)
    pairs = encode_pairs(tokenizer, list(zip(item.contexts, item.continuations, strict=True)))
    sums = [_manual_logprob(model, c, r) for c, r in pairs]
    best = max(range(3), key=sums.__getitem__)
    best_norm = max(range(3), key=lambda i: sums[i] / (len(item.continuations[i]) - 1))
    items = [Choices(item.contexts, item.continuations, g) for g in range(3)]
    counts = choice_accuracy(model, tokenizer, items, batch_size=4, progress=False)
    assert {k: counts[k] for k in ("n", "correct", "correct_norm")} == {
        "n": 3, "correct": 1, "correct_norm": 1}
    assert counts["per_item"]["correct"] == [int(g == best) for g in range(3)]
    assert counts["per_item"]["correct_norm"] == [int(g == best_norm) for g in range(3)]
    right = [choice_accuracy(model, tokenizer, [items[best]], progress=False)["correct"],
             choice_accuracy(model, tokenizer, [items[best_norm]], progress=False)["correct_norm"]]
    assert right == [1, 1]


def test_acc_norm_divides_by_the_option_characters_as_lm_eval_does(monkeypatch):
    """lm-eval's acc_norm: loglik / len(choice), the choice without its leading " " and counted
    in characters (its acc_bytes counts UTF-8 bytes)."""
    drink = Choices(("Question: drink?\nAnswer:",) * 3, (" café", " tea", " cocoa"), gold=0)
    # per character -4.2/4, -3.3/3, -5.4/5 = -1.05, -1.1, -1.08: café; counting the leading
    # space, -4.2/5, -3.3/4, -5.4/6 = -0.84, -0.825, -0.9 would pick tea
    assert choice_picks(drink, [-4.2, -3.3, -5.4]) == (1, 0)
    accent = Choices(("Q:",) * 2, (" é", " ab"), gold=1)
    # per character -2.0/1, -3.2/2 = -2.0, -1.6: ab; per byte (é is 2) or with the space,
    # -2.0/2, -3.2/2 or -2.0/2, -3.2/3 would pick é
    assert choice_picks(accent, [-2.0, -3.2]) == (0, 1)
    scores = [(-4.2, 2), (-3.3, 1), (-5.4, 2), (-2.0, 1), (-3.2, 1)]
    monkeypatch.setattr(loglik, "score_continuations", lambda *a, **k: scores)
    counts = choice_accuracy(tiny_model(), char_tokenizer(), [drink, accent], progress=False)
    assert counts == {"n": 2, "correct": 0, "correct_norm": 2,
                      "per_item": {"correct": [0, 0], "correct_norm": [1, 1]}}


def test_response_nll_is_the_token_weighted_training_loss():
    model, tokenizer = tiny_model(), char_tokenizer()
    examples = [Example("add 1 and 2", "", "3", "3"), Example("say hi", "", "hello there", "")]
    result = response_nll(model, tokenizer, examples, batch_size=2, progress=False)
    losses, counts = [], []
    for example in examples:
        prompt = tokenizer(format_prompt(example.instruction))["input_ids"]
        response = tokenizer(example.output, add_special_tokens=False)["input_ids"] + [1]
        losses.append(-_manual_logprob(model, prompt, response))
        counts.append(len(response))
    assert result["tokens"] == sum(counts) and result["n"] == 2
    assert result["nll"] == pytest.approx(sum(losses) / sum(counts), abs=1e-5)
    assert result["per_item"]["tokens"] == counts
    assert result["per_item"]["loss"] == pytest.approx(losses, abs=1e-4)


# Generation


def test_batched_generation_equals_one_at_a_time():
    tokenizer = char_tokenizer()
    tokenizer.add_tokens(["\n"])  # the prompt's newlines; else every prompt ends in <unk>
    model = tiny_model("mistral")  # untied embeddings: replies differ between prompts
    examples = [Example("say hi", "", "", ""), Example("a longer instruction", "ctx", "", ""),
                Example("x", "", "", "")]
    batched = generate_replies(model, tokenizer, examples, 8, batch_size=3, progress=False)
    single = generate_replies(model, tokenizer, examples, 8, batch_size=1, progress=False)
    assert batched == single and len(set(batched)) > 1


# evaluate() and the command line


def test_fixed_subset_is_the_same_for_every_call():
    items = [Example(str(i), "", "x", "") for i in range(50)]
    first = fixed_subset(items, 5)
    assert first == fixed_subset(items, 5) and len(first) == 5
    assert fixed_subset(items, None) == items == fixed_subset(items, 80)


def test_unknown_task_and_unusable_protocol():
    with pytest.raises(SketchtuneError, match="ARC-Easy.*ppl"):
        check_task("arc-eazy")
    assert check_task("ppl") == "ppl"
    assert check_task("hellaswag", "loglik") == "hellaswag"


@needs_shared
def test_check_task_names():
    assert check_task("arc-easy") == "ARC-Easy"
    with pytest.raises(SketchtuneError, match="answer options"):
        check_task("gsm8k", "loglik")


@needs_shared
def test_evaluate_commonsense_and_math_end_to_end():
    torch.manual_seed(0)
    model, tokenizer = tiny_model(), char_tokenizer()
    arc = evaluate(model, tokenizer, "ARC-Easy", "loglik", limit=4, batch_size=8, progress=False)
    assert arc["n"] == 4 and arc["unparsed"] == 0 and arc["protocol"] == "loglik"
    assert 0 <= arc["ci95"][0] <= arc["accuracy"] <= arc["ci95"][1] <= 1
    assert 0 <= arc["acc_norm"] <= 1 and len(arc["acc_norm_ci95"]) == 2

    reply = evaluate(model, tokenizer, "ARC-Easy", "generate", limit=4, max_new_tokens=4,
                     progress=False)
    assert reply["n"] == 4 and reply["no_answer"] == 4 and reply["accuracy"] == 0.0

    math = evaluate(model, tokenizer, "gsm8k", "generate", limit=4, max_new_tokens=4,
                    progress=False)
    assert math["n"] == 4 and math["limit"] == 4 and math["ci95"][0] == 0.0

    nll = evaluate(model, tokenizer, "gsm8k", "nll", limit=4, batch_size=4, progress=False)
    assert nll["n"] == 4 and nll["nll"] > 0
    assert nll["nll_ci95"][0] < nll["nll"] < nll["nll_ci95"][1]


def test_evaluate_a_user_file(tiny_task_file):
    model, tokenizer = tiny_model(), char_tokenizer()
    nll = evaluate(model, tokenizer, str(tiny_task_file), "nll", limit=4, progress=False)
    assert nll["n"] == 4 and nll["task"] == str(tiny_task_file)
    with pytest.raises(SketchtuneError, match="gold `answer`"):  # free text: nothing to extract
        evaluate(model, tokenizer, str(tiny_task_file), "generate", limit=4, progress=False)


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@needs_shared
def test_cli_eval_loglik_on_a_sketched_model(sketched_tiny_dir, tmp_path, capsys):
    output = tmp_path / "results.json"
    code, out, err = _run(
        capsys, "eval", sketched_tiny_dir, "--task", "ARC-Easy", "--limit", 4,
        "--protocol", "loglik", "--output", output,
    )
    assert code == 0, err
    saved = json.loads(output.read_text())
    assert saved == json.loads(out)
    assert saved["model"] == str(sketched_tiny_dir) and saved["task_sketch"] is None
    (result,) = saved["results"]
    assert result["task"] == "ARC-Easy" and result["n"] == 4 and result["limit"] == 4
    assert len(result["ci95"]) == 2 and "acc_norm" in result


def test_cli_unknown_task_is_one_line(tiny_model_dir, capsys):
    code, _, err = _run(capsys, "eval", tiny_model_dir, "--task", "ppl,nope")
    assert code == 2
    (line,) = err.strip().splitlines()
    assert line.startswith("error: unknown task 'nope'")


# Agreement with lm-evaluation-harness (benchmarks/lmeval_agreement.py at full size)


@pytest.mark.slow
@needs_shared
def test_loglik_chooses_what_lm_eval_chooses_on_arc_easy():
    pytest.importorskip("lm_eval")
    from benchmarks.lmeval_agreement import arc_items, compare
    from sketchtune.sources import load_dense

    model, tokenizer = load_dense("smollm2-135m")
    summary, rows = compare(model, tokenizer, arc_items(30), batch_size=16)
    assert len(rows) == 30 and summary["prompt_mismatches"] == 0
    assert summary["agree_acc"] >= 0.99 and summary["agree_acc_norm"] >= 0.99
    assert summary["ours_acc"] == pytest.approx(summary["lmeval_acc"], abs=0.005)
    assert summary["ours_acc_norm"] == pytest.approx(summary["lmeval_acc_norm"], abs=0.005)
