"""Generation on a sketched tiny model: the compiled decode (static cache) against eager, and the
bf16 embeddings against fp32 ones."""

import torch

from sketchtune.api import load_any
from sketchtune.generate import decode_options, generate_text
from sketchtune.kernels import cpu
from sketchtune.serving import Bf16Head, bf16_embeddings, decode_threads


def test_compiled_decode_matches_eager_greedy_decode(sketched_tiny_dir):
    # As `sketchtune generate` loads it: bf16 tables (the compiled graph calls the C++ op) and
    # bf16 embeddings.
    model, tokenizer = load_any(str(sketched_tiny_dir))  # with bf16 embeddings, as served
    inputs = tokenizer("hello there", return_tensors="pt")
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()  # count only this test's graphs
    runs = []
    governor = decode_threads(model)
    for compile in (False, True):
        steps = {kind: choice.steps for kind, choice in governor.kinds.items()}
        with torch.no_grad():
            runs.append(model.generate(
                **inputs, max_new_tokens=12, min_new_tokens=12, do_sample=False,
                output_logits=True, return_dict_in_generate=True, pad_token_id=1,
                **decode_options(compile, inputs["input_ids"].shape[1] + 12),
            ))
    eager, compiled = runs
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # it did compile
    assert torch.equal(compiled.sequences, eager.sequences)
    torch.testing.assert_close(torch.stack(compiled.logits), torch.stack(eager.logits))
    # the text path takes the same route (the compiled step is cached by now)
    text = generate_text(model, tokenizer, "hello there", max_new_tokens=12, compile=True)
    assert text == tokenizer.decode(eager.sequences[0, inputs["input_ids"].shape[1]:])
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    generate_text(model, tokenizer, "hi", max_new_tokens=40, compile=True)  # another length
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs  # no recompile
    # a generate that may compile keeps the caller's thread count: the governor timed nothing
    # (a count it changed would fail the compiled step's guard and compile it again)
    assert {kind: choice.steps for kind, choice in governor.kinds.items()} == steps


def test_bf16_embeddings_keep_fp32_activations_and_close_logits(sketched_tiny_dir):
    reference, _ = load_any(str(sketched_tiny_dir), serve=False)
    model, _ = load_any(str(sketched_tiny_dir), serve=False)
    bf16_embeddings(model)
    bf16_embeddings(model)  # idempotent: what `load` already did is not done twice
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert embedding.weight.dtype == torch.bfloat16 and head.weight is embedding.weight
    assert isinstance(head, Bf16Head)
    # the stored embedding is bf16, so the weights are exact
    torch.testing.assert_close(embedding.weight.float(), reference.get_input_embeddings().weight)
    ids = torch.randint(2, 97, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = reference(input_ids=ids).logits, model(input_ids=ids).logits
        step = model(input_ids=ids[:1, :1]).logits  # one token: the GEMV, not the GEMM
    assert got.dtype == torch.float32 and step.dtype == torch.float32
    scale = expected.abs().max().item()
    # 32 tokens take an fp32 GEMM on the widened weight; one token, the CPU kernel's fp32
    # arithmetic on the exact weights; without the kernels the input is rounded to bf16
    atol = 1e-5 * scale if cpu.available() else 2e-2 * scale
    torch.testing.assert_close(got, expected, rtol=0, atol=atol)
    torch.testing.assert_close(step, expected[:1, :1], rtol=0, atol=atol)


def test_a_pad_id_of_0_is_the_pad_id_not_eos():
    # `pad_token_id or eos_token_id` sent EOS whenever the pad token had id 0
    from sketchtune.data.tokens import collate, pad_id
    from tests.conftest import VOCAB, char_tokenizer

    tokenizer = char_tokenizer()
    tokenizer.pad_token = VOCAB[0]
    assert tokenizer.pad_token_id == 0 != tokenizer.eos_token_id
    assert pad_id(tokenizer) == 0
    seen = {}

    class Recorder(torch.nn.Module):
        def generate(self, input_ids, **kwargs):
            seen.update(kwargs)
            return input_ids

    generate_text(Recorder(), tokenizer, "hi", max_new_tokens=1)
    assert seen["pad_token_id"] == 0
    batch = collate(tokenizer)([{"input_ids": [5], "attention_mask": [1], "labels": [5]},
                                {"input_ids": [5, 6], "attention_mask": [1, 1], "labels": [5, 6]}])
    assert batch["input_ids"][0].tolist() == [5, 0]
