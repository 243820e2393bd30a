"""Generation on a sketched tiny model: the compiled decode (static cache) against eager."""

import torch

from sketchtune.api import load_any
from sketchtune.generate import decode_options, generate_text


def test_compiled_decode_matches_eager_greedy_decode(sketched_tiny_dir):
    # bf16 tables, as `sketchtune generate` loads them: the compiled graph calls the C++ op.
    model, tokenizer = load_any(str(sketched_tiny_dir), values_dtype=None)
    inputs = tokenizer("hello there", return_tensors="pt")
    torch._dynamo.reset()
    runs = []
    for compile in (False, True):
        with torch.no_grad():
            runs.append(model.generate(
                **inputs, max_new_tokens=12, min_new_tokens=12, do_sample=False,
                output_logits=True, return_dict_in_generate=True, pad_token_id=1,
                **decode_options(compile),
            ))
    eager, compiled = runs
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # it did compile
    assert torch.equal(compiled.sequences, eager.sequences)
    torch.testing.assert_close(torch.stack(compiled.logits), torch.stack(eager.logits))
    # the text path takes the same route (the compiled step is cached by now)
    text = generate_text(model, tokenizer, "hello there", max_new_tokens=12, compile=True)
    assert text == tokenizer.decode(eager.sequences[0, inputs["input_ids"].shape[1]:])
