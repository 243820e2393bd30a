"""fast_decode: the served model's greedy generate gives transformers' tokens, in fewer ops."""

from __future__ import annotations

import pytest
import torch

from sketchtune.compression import SketchConfig, compress_model
from sketchtune.fast_decode import eligible
from sketchtune.hub import load, save_sketched
from sketchtune.serving import fast_decode_disabled
from tests.conftest import char_tokenizer, tiny_model

CALIB = torch.randint(2, 97, (4, 32), generator=torch.Generator().manual_seed(1))
PROMPT = torch.randint(2, 97, (1, 9), generator=torch.Generator().manual_seed(3))


@pytest.fixture(params=["llama", "mistral", "qwen2"])
def served(request, tmp_path):
    model = tiny_model(request.param)
    compress_model(model, CALIB, SketchConfig(bits=4, gpr=2), progress=False)
    save_sketched(model, char_tokenizer(), tmp_path / "m")
    return load(tmp_path / "m", values_dtype=None)  # as users load it: served


def test_greedy_tokens_equal_transformers_generate(served):
    for options in ({"max_new_tokens": 40}, {"max_new_tokens": 12, "min_new_tokens": 12},
                    {"max_new_tokens": 30, "eos_token_id": 5}):
        fast = served.generate(PROMPT, do_sample=False, pad_token_id=1, **options)
        assert served._fast_decoder is not None  # the fast loop ran
        with fast_decode_disabled():
            reference = served.generate(PROMPT, do_sample=False, pad_token_id=1, **options)
        assert torch.equal(fast, reference)


@pytest.mark.parametrize("layer_op", [False, True])
def test_logits_of_the_fast_steps_match_the_model(served, layer_op):
    """Against the model's own forward over the whole sequence: the prompt through the Python
    loop, then three new tokens through it or through the C++ `decode_layer` op."""
    from sketchtune.fast_decode import FastDecoder

    decoder = FastDecoder(served)
    fused = decoder._fused_arguments() if layer_op else None
    if layer_op:
        assert all(arguments is not None for arguments in fused)  # every layer takes the op
    new = PROMPT[:, :3]
    sequence = torch.cat([PROMPT, new], dim=1)
    shape = (1, decoder.kv_heads, sequence.shape[1], decoder.head_dim)
    caches = [(torch.empty(shape), torch.empty(shape)) for _ in decoder.layers]
    cos, sin = decoder._rotary(sequence.shape[1])
    with torch.no_grad():
        full = served(sequence).logits.float()
        logits = [decoder._step(PROMPT, 0, caches, cos, sin, fused)]
        for i in range(new.shape[1]):
            logits.append(decoder._step(new[:, i:i + 1], PROMPT.shape[1] + i, caches, cos, sin,
                                        fused))
    for i, step in enumerate(logits):
        torch.testing.assert_close(step, full[:, PROMPT.shape[1] - 1 + i], rtol=1e-4, atol=1e-4)


def test_reference_kernels_keep_the_python_loop(served):
    from sketchtune import kernels
    from sketchtune.fast_decode import FastDecoder

    with kernels.compute_path("reference"):
        assert FastDecoder(served)._fused_arguments() == [None] * len(served.model.layers)


def test_other_generate_calls_go_to_transformers(served):
    two = PROMPT.repeat(2, 1)
    for args, kwargs in (((PROMPT,), {"do_sample": True}), ((two,), {}),
                         ((PROMPT,), {"num_beams": 2}), ((PROMPT,), {"output_scores": True}),
                         ((PROMPT,), {"attention_mask": torch.zeros_like(PROMPT)}),
                         ((PROMPT,), {"repetition_penalty": 1.3})):
        assert not eligible(served, args, kwargs)
    assert eligible(served, (PROMPT,), {"max_new_tokens": 3, "do_sample": False})
    out = served.generate(two, max_new_tokens=4, do_sample=False, pad_token_id=1)
    assert out.shape == (2, PROMPT.shape[1] + 4)
    served.generation_config.repetition_penalty = 1.2  # the model's own config counts too
    assert not eligible(served, (PROMPT,), {"max_new_tokens": 3})
