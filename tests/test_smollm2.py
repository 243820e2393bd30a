"""The real SmolLM2-135M path with few calibration samples (minutes on 2 cores): `-m slow`."""

import pytest
import torch

from sketchtune.api import compress, heldout_perplexity, load_any
from sketchtune.compression import SketchConfig
from sketchtune.generate import generate_text
from sketchtune.hub import load, save_sketched
from sketchtune.sources import load_dense

pytestmark = pytest.mark.slow


def test_smollm2_compress_save_load_generate(tmp_path):
    model, tokenizer = load_dense("smollm2-135m")
    dense_ppl = heldout_perplexity(model, tokenizer, samples=4, seq_len=256, progress=False)
    compress(model, tokenizer, SketchConfig(bits=4, gpr=4), samples=4, seq_len=256)
    assert len(model.config.quantization_config.modules) == 30 * 7
    save_sketched(model, tokenizer, tmp_path / "smol")

    loaded, tok = load_any(str(tmp_path / "smol"))
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    sketched_ppl = heldout_perplexity(loaded, tok, samples=4, seq_len=256, progress=False)
    # Even 4 calibration sequences keep the sketch close to the dense model.
    assert sketched_ppl["perplexity"] < 1.3 * dense_ppl["perplexity"]
    assert "Paris" in generate_text(loaded, tok, "What is the capital of France?", 16, chat=True)
    assert load(tmp_path / "smol").config.quantization_config.groups_per_row == 4
