"""Activation checkpointing modes: every mode gives "off"'s loss and gradients; what the backward
reruns is counted op by op ("selective" reruns no matmul, "full" reruns them all)."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from conftest import tiny_model
from torch.utils._python_dispatch import TorchDispatchMode

from sketchtune import checkpointing
from sketchtune.api import load
from sketchtune.baselines import lora_model
from sketchtune.loss import causal_lm_loss
from sketchtune.train import freeze_all_but_values

MODES = checkpointing.MODES


class CountOps(TorchDispatchMode):
    """Counts the ops dispatched while active, by name without overload ("aten::mm")."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.name().split(".")[0]] += 1
        return func(*args, **(kwargs or {}))


def sketched(folder):
    model = load(folder).train()
    freeze_all_but_values(model)
    return model


def lora():
    return lora_model(tiny_model(), rank=4).train()


def step(model, mode: str) -> tuple[torch.Tensor, dict[str, torch.Tensor], Counter]:
    """Loss, gradients and the ops the backward dispatched, under `mode`."""
    checkpointing.enable(model, mode)
    ids = torch.randint(2, 97, (2, 24), generator=torch.Generator().manual_seed(3))
    loss = causal_lm_loss(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                                  "labels": ids})
    with CountOps() as backward_ops:
        loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads, backward_ops.counts


@pytest.mark.parametrize("build", ["sketch", "lora"])
def test_modes_give_the_same_loss_and_gradients(build, sketched_tiny_dir):
    model = sketched(sketched_tiny_dir) if build == "sketch" else lora()
    runs = {mode: step(model, mode) for mode in MODES}
    loss, grads, _ = runs["off"]
    assert grads
    for mode in ("selective", "full"):
        torch.testing.assert_close(runs[mode][0], loss, rtol=0, atol=0)
        assert runs[mode][1].keys() == grads.keys()
        for name, grad in grads.items():
            torch.testing.assert_close(runs[mode][1][name], grad, rtol=1e-6, atol=1e-7)


def backward_ops(model) -> dict[str, Counter]:
    # Warm up: the loss's first call checks the head once, and enabling checkpointing once
    # makes the embeddings' output require grad from then on (more input gradients).
    step(model, "full")
    return {mode: step(model, mode)[2] for mode in MODES}


def test_selective_reruns_no_matmul_and_full_reruns_them(sketched_tiny_dir):
    ops = backward_ops(sketched(sketched_tiny_dir))
    forward, layers = "sketchtune::lut_linear", 2 * 7  # 2 blocks of 7 sketched projections
    assert ops["off"][forward] == ops["selective"][forward] == 0
    assert ops["full"][forward] == layers
    assert ops["off"]["aten::silu"] == 0 < ops["selective"]["aten::silu"]  # reran elementwise


def test_selective_reruns_no_dense_matmul_for_lora():
    ops = backward_ops(lora())
    assert ops["selective"]["aten::mm"] == ops["off"]["aten::mm"] < ops["full"]["aten::mm"]
    assert ops["off"]["aten::silu"] == 0 < ops["selective"]["aten::silu"]


def test_auto_is_full_above_the_threshold_and_selective_below():
    at = checkpointing.FULL_ABOVE
    assert checkpointing.resolve("auto", at) == "selective"
    assert checkpointing.resolve("auto", at + 1) == "full"
    assert checkpointing.resolve("off", at + 1) == "off"
