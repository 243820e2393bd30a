"""The inference defaults every loader applies (`serving.serve`): bf16 embeddings and head that
leave the model's reported dtype and its saved config alone, and the decode thread count chosen
by timing."""

import contextlib
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from sketchtune.serving import Bf16Head, DecodeThreads, serving_disabled


@contextlib.contextmanager
def threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def greedy(model, ids, new_tokens: int) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(input_ids=ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                              do_sample=False, pad_token_id=1)


IDS = torch.randint(2, 97, (1, 10), generator=torch.Generator().manual_seed(3))


def test_from_pretrained_serves_a_cpu_model_and_saves_it_as_fp32(sketched_tiny_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(sketched_tiny_dir)
    assert model.get_input_embeddings().weight.dtype == torch.bfloat16
    assert isinstance(model.get_output_embeddings(), Bf16Head)
    assert model.dtype == torch.float32  # the activations' dtype, not the first parameter's
    with serving_disabled():
        stored = AutoModelForCausalLM.from_pretrained(sketched_tiny_dir)
    assert stored.get_input_embeddings().weight.dtype == torch.float32
    assert not hasattr(stored, "_decode_threads")

    model.save_pretrained(tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "float32"
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert again.model.norm.weight.dtype == torch.float32  # a reload computes in fp32 again
    with torch.no_grad():
        assert torch.equal(again(IDS).logits, model(IDS).logits)


def test_decode_threads_times_every_count_and_restores_the_callers(sketched_tiny_dir):
    model = AutoModelForCausalLM.from_pretrained(sketched_tiny_dir)
    with serving_disabled():
        plain = AutoModelForCausalLM.from_pretrained(sketched_tiny_dir)
    governor = model._decode_threads
    with threads(2):
        out = greedy(model, IDS, 20)
        assert torch.get_num_threads() == 2
        expected = greedy(plain, IDS, 20)
    assert torch.equal(out, expected)
    assert set(governor.seconds) == {1, 2} and all(s > 0 for s in governor.seconds.values())
    assert governor.steps == 19  # every step after the prefill's, which produced the first token


def test_decode_threads_leave_prefill_and_training_alone(sketched_tiny_dir):
    model = AutoModelForCausalLM.from_pretrained(sketched_tiny_dir)
    governor = model._decode_threads
    with threads(2):
        with torch.no_grad():
            model(IDS)  # a prompt, not a decode step
        model(IDS[:, :1])  # one token with gradients on: a training step
    assert governor.steps == 0 and not governor.seconds


@pytest.mark.parametrize("most, choices", [(2, {1, 2}), (8, {1, 4, 8}), (1, {1})])
def test_decode_threads_run_the_fastest_count_and_probe_the_others(most, choices):
    governor = DecodeThreads(probe_every=4)
    tried = []
    for _ in range(len(choices)):  # first every count once
        tried.append(governor.pick(most))
        governor.seconds[tried[-1]] = 0.01 * tried[-1]  # more threads slower: a busy machine
        governor.steps += 1
    assert set(tried) == choices
    picks = []
    for _ in range(16):
        picks.append(governor.pick(most))
        governor.steps += 1
    probes = [p for step, p in enumerate(picks, start=len(choices)) if step % 4 == 0]
    assert all(p == 1 for step, p in enumerate(picks, start=len(choices)) if step % 4)
    assert set(probes) == (choices - {1} or {1})  # the others take turns as probes
