"""Tiny random models and a character-level tokenizer, built in milliseconds from configs."""

from __future__ import annotations

import string

import pytest
import torch
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    GemmaConfig,
    LlamaConfig,
    MistralConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

SPECIALS = ["<unk>", "<eos>"]
VOCAB = SPECIALS + list(string.printable[:95])  # 97 symbols


def char_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {token: i for i, token in enumerate(VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")


def tiny_config(family: str = "llama"):
    common = dict(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        eos_token_id=1, pad_token_id=1, bos_token_id=1,
    )
    if family == "llama":
        return LlamaConfig(**common, tie_word_embeddings=True)
    if family == "mistral":
        return MistralConfig(**common)
    if family == "qwen2":
        return Qwen2Config(**common)  # q, k, v carry biases
    if family == "gemma":
        return GemmaConfig(**common, head_dim=16)
    raise ValueError(family)


def tiny_model(family: str = "llama", seed: int = 0):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(family)).eval()


@pytest.fixture
def tokenizer():
    return char_tokenizer()


@pytest.fixture
def tiny_model_dir(tmp_path):
    """A dense tiny Llama saved as a Hugging Face folder, with its tokenizer."""
    folder = tmp_path / "tiny-llama"
    tiny_model().save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture
def sketched_tiny_dir(tmp_path):
    """A sketched tiny Llama folder (4 bits, gpr 2) with its tokenizer."""
    from sketchtune.compression import SketchConfig, compress_model
    from sketchtune.hub import save_sketched

    model = tiny_model()
    calibration = torch.randint(2, 97, (4, 32), generator=torch.Generator().manual_seed(1))
    compress_model(model, calibration, SketchConfig(bits=4, gpr=2), progress=False)
    save_sketched(model, char_tokenizer(), tmp_path / "sketched")
    return tmp_path / "sketched"


@pytest.fixture
def tiny_task_file(tmp_path):
    """A small instruction dataset in a user JSONL file."""
    import json

    rows = [
        {"instruction": f"add {a} and {b}", "output": f"the sum is {a + b}"}
        for a in range(6)
        for b in range(6)
    ]
    path = tmp_path / "task.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path
