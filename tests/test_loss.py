"""The chunked causal-LM loss equals transformers' own, value and gradients, on tiny models."""

import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma2Config, LlamaConfig

from sketchtune.loss import IGNORE_INDEX, causal_lm_loss


def tiny_llama(seed: int = 0):
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
    )
    return AutoModelForCausalLM.from_config(config).train()


def padded_batch(vocab: int = 300, seq: int = 19):
    """(3, seq) inputs with a masked prompt, a right-padded row and an all-counted row."""
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (3, seq), generator=generator)
    labels, mask = ids.clone(), torch.ones_like(ids)
    labels[0, :6] = IGNORE_INDEX  # prompt
    labels[1, 11:], mask[1, 11:] = IGNORE_INDEX, 0  # padding
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def loss_and_grads(model, loss_fn):
    model.zero_grad()
    loss = loss_fn()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                           if p.requires_grad}


@pytest.mark.parametrize("chunk", [1, 4, 7, 57, None])  # 57 counted positions: 1 chunk
@pytest.mark.parametrize("num_items", [None, 100])
def test_value_and_gradients_equal_the_plain_loss(chunk, num_items):
    model, batch = tiny_llama(), padded_batch()
    extra = {} if num_items is None else {"num_items_in_batch": torch.tensor(num_items)}
    plain, plain_grads = loss_and_grads(model, lambda: model(**batch, **extra).loss)
    chunked, grads = loss_and_grads(
        model, lambda: causal_lm_loss(model, batch, extra.get("num_items_in_batch"), chunk)
    )
    torch.testing.assert_close(chunked, plain, rtol=1e-6, atol=0)
    assert set(grads) == set(plain_grads) and len(grads) > 10  # every parameter trains
    for name, grad in plain_grads.items():
        torch.testing.assert_close(grads[name], grad, msg=name)


def test_frozen_head_and_no_grad():
    model, batch = tiny_llama(), padded_batch()
    model.get_output_embeddings().weight.requires_grad_(False)  # tied: embeddings too
    plain, plain_grads = loss_and_grads(model, lambda: model(**batch).loss)
    chunked, grads = loss_and_grads(model, lambda: causal_lm_loss(model, batch, chunk_size=5))
    torch.testing.assert_close(chunked, plain, rtol=1e-6, atol=0)
    assert set(grads) == set(plain_grads)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(grads[name], grad, msg=name)
    with torch.no_grad():
        torch.testing.assert_close(causal_lm_loss(model, batch), plain, rtol=1e-6, atol=0)


def test_gradient_accumulation_with_the_trainer_count_is_exact():
    """Two half batches, each divided by the whole batch's count, sum to the whole batch's loss."""
    model, batch = tiny_llama(), padded_batch()
    count = batch["labels"][:, 1:].ne(IGNORE_INDEX).sum()  # as HF Trainer counts
    whole, whole_grads = loss_and_grads(model, lambda: causal_lm_loss(model, batch))
    halves = [{k: v[rows] for k, v in batch.items()} for rows in (slice(0, 1), slice(1, 3))]
    model.zero_grad()
    total = sum(causal_lm_loss(model, half, count, chunk_size=3) for half in halves)
    total.backward()
    torch.testing.assert_close(total.detach(), whole, rtol=1e-6, atol=0)
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, whole_grads[name], msg=name)


def test_a_head_with_soft_capping_gets_the_plain_loss():
    torch.manual_seed(0)
    config = Gemma2Config(
        vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, final_logit_softcapping=0.5,
    )
    model, batch = AutoModelForCausalLM.from_config(config).train(), padded_batch()
    plain = model(**batch).loss
    torch.testing.assert_close(causal_lm_loss(model, batch), plain, rtol=1e-6, atol=0)


def test_through_peft_lora():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj", "down_proj"],
                                                    task_type="CAUSAL_LM"))
    for name, param in model.named_parameters():  # B starts at zero: give it a gradient path
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1)
    batch = padded_batch()
    plain, plain_grads = loss_and_grads(model, lambda: model(**batch).loss)
    chunked, grads = loss_and_grads(model, lambda: causal_lm_loss(model, batch, chunk_size=8))
    torch.testing.assert_close(chunked, plain, rtol=1e-6, atol=0)
    assert set(grads) == set(plain_grads) and all("lora_" in n for n in grads)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(grads[name], grad, msg=name)


def test_under_bf16_autocast():
    model, batch = tiny_llama(), padded_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain, plain_grads = loss_and_grads(model, lambda: model(**batch).loss)
        chunked, grads = loss_and_grads(model, lambda: causal_lm_loss(model, batch, chunk_size=8))
    torch.testing.assert_close(chunked, plain, rtol=1e-3, atol=0)
    for name, grad in plain_grads.items():
        assert grads[name].dtype == torch.float32
        torch.testing.assert_close(grads[name], grad, rtol=2e-2, atol=1e-3, msg=name)


def test_a_served_bf16_head_computes_in_the_activations_dtype():
    # serving.bf16_embeddings keeps the tied head's weight bf16 for fp32 activations: the chunked
    # loss must run the fp32 matmul the plain forward runs, not fail on mixed dtypes
    from sketchtune.serving import bf16_embeddings

    model, batch = tiny_llama(), padded_batch()
    embedding = model.get_input_embeddings().weight
    embedding.data = embedding.data.bfloat16().float()  # weights on the bf16 grid, all in fp32
    plain, plain_grads = loss_and_grads(model, lambda: model(**batch).loss)
    served = tiny_llama()
    served.load_state_dict(model.state_dict())
    bf16_embeddings(served)  # the same weights, the embedding and tied head stored in bf16
    chunked, grads = loss_and_grads(served, lambda: causal_lm_loss(served, batch, chunk_size=5))
    torch.testing.assert_close(chunked, plain, rtol=1e-5, atol=0)
    fp32 = [name for name, g in grads.items() if g.dtype == torch.float32]  # the bf16 embedding's
    assert len(fp32) == len(grads) - 1  # gradient is rounded to bf16: every other one compared
    for name in fp32:
        torch.testing.assert_close(grads[name], plain_grads[name], rtol=1e-4, atol=1e-6, msg=name)
