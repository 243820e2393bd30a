"""The inference defaults every loader applies (`serving.serve`): bf16 embeddings and head that
leave the model's reported dtype and its saved config alone, and the decode thread count chosen
by timing."""

import contextlib
import itertools
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache, StaticCache

from sketchtune.serving import Bf16Head, ThreadChoice, _may_compile, serving_disabled
from tests.conftest import tiny_model


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
    decode = model._decode_threads.kinds["decode"]
    with threads(2):
        out = greedy(model, IDS, 20)
        assert torch.get_num_threads() == 2
        expected = greedy(plain, IDS, 20)
    assert torch.equal(out, expected)
    assert set(decode.seconds) == {1, 2} and all(s > 0 for s in decode.seconds.values())
    assert decode.steps == 19  # every step after the prompt's, which produced the first token
    assert model._decode_threads.kinds["prefill"].steps == 1
    with threads(2), torch.no_grad():
        model(IDS[:, :1])  # a step outside generate gives the count back after the forward
        assert torch.get_num_threads() == 2 and decode.steps == 20


def test_decode_threads_leave_training_alone(sketched_tiny_dir):
    model = AutoModelForCausalLM.from_pretrained(sketched_tiny_dir)
    with threads(2):
        model(IDS[:, :1])  # one token with gradients on: a training step
    assert all(kind.steps == 0 for kind in model._decode_threads.kinds.values())


def simulate(choice: ThreadChoice, seconds: dict[int, float], steps: int, most: int) -> list[int]:
    used = []
    for _ in range(steps):
        used.append(choice.pick(most))
        choice.record(used[-1], seconds[used[-1]], most)
    return used


@pytest.mark.parametrize("most, choices", [(2, {1, 2}), (8, {1, 4, 8}), (1, {1})])
def test_thread_choice_tries_every_count_then_runs_the_fastest(most, choices):
    used = simulate(ThreadChoice(), {n: 0.01 * n for n in choices}, 100, most)
    assert set(used[:len(choices)]) == choices
    assert used.count(1) > 100 - 4 * len(choices)  # the others only as rare probes


def test_a_losing_count_is_probed_ever_more_rarely_and_taken_up_when_it_wins():
    choice = ThreadChoice(probe_every=16, max_interval=256, probe_budget=1.0)
    busy = simulate(choice, {1: 0.01, 2: 0.02}, 1000, 2)  # two threads slower: a busy machine
    probes = [step for step, n in enumerate(busy) if n == 2]
    gaps = [b - a for a, b in itertools.pairwise(probes)]
    assert gaps == sorted(gaps) and gaps[-1] == 256 and len(probes) < 12
    quiet = simulate(choice, {1: 0.01, 2: 0.005}, 300, 2)  # quiet again: two threads win
    assert quiet.index(2) <= 256 and quiet[-50:] == [2] * 50


@pytest.mark.parametrize("slower", [1.5, 5.0, 40.0])
def test_probes_of_a_losing_count_stay_within_their_time_budget(slower):
    choice = ThreadChoice(probe_budget=0.03)
    seconds = {1: 0.01, 2: 0.01 * slower}
    used = simulate(choice, seconds, 4000, 2)[100:]  # past the first tries
    probing = sum(seconds[n] - seconds[1] for n in used)
    assert probing <= 0.03 * 0.01 * len(used) * 1.1  # 10% slack for where the window cuts


def test_bf16_head_trains_under_autocast_without_widening_its_weight(monkeypatch):
    """Under bf16 autocast the served head computes as autocast would from its bf16 weight (a
    128k-vocabulary head widened to fp32 was a 1 GB copy per step at the 1B shape)."""
    torch.manual_seed(0)
    head = Bf16Head(16, 40, bias=False)
    head.weight.data = head.weight.data.bfloat16()
    x = torch.randn(3, 16, requires_grad=True)
    widened = []
    original = torch.Tensor.to

    def watch(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        if self is head.weight and out.dtype == torch.float32:
            widened.append(out)
        return out

    monkeypatch.setattr(torch.Tensor, "to", watch)
    with torch.autocast("cpu", torch.bfloat16):
        ours = head(x)
        reference = torch.nn.functional.linear(x, head.weight)
    assert not widened and ours.dtype == torch.bfloat16
    assert torch.equal(ours, reference)
    ours.float().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    head(x.detach().requires_grad_())  # without autocast: the fp32 math, weight widened
    assert widened


def test_only_generate_calls_with_a_static_cache_count_as_compilable():
    model = tiny_model()
    assert not _may_compile(model, {})
    for name in ("dynamic", "offloaded", "quantized"):
        assert not _may_compile(model, {"cache_implementation": name})
    assert _may_compile(model, {"cache_implementation": "static"})
    assert not _may_compile(model, {"past_key_values": DynamicCache(config=model.config)})
    static = StaticCache(config=model.config, max_cache_len=16)
    assert _may_compile(model, {"past_key_values": static})
