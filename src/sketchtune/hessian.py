"""The input Hessian of a projection, H = 2/n Σ x xᵀ over the n input rows it sees (GPTQ's
proxy for how much an error in each input direction costs), accumulated batch by batch."""

from __future__ import annotations

import torch


class InputHessian:
    """Sums x xᵀ of (..., d_in) inputs in fp32 on `device`; `finish` scales it to H in place."""

    def __init__(self, d_in: int, device: torch.device | str | None = None) -> None:
        self.sum = torch.zeros(d_in, d_in, device=device)  # (d_in, d_in)
        self.rows = 0

    def add(self, x: torch.Tensor) -> None:
        flat = x.detach().reshape(-1, self.sum.shape[0]).float()  # (rows, d_in)
        self.sum.addmm_(flat.T, flat)
        self.rows += flat.shape[0]

    def finish(self) -> torch.Tensor:
        return self.sum.mul_(2.0 / max(self.rows, 1))


def weighted_error(
    weight: torch.Tensor, approx: torch.Tensor, hessian: torch.Tensor, damp: float
) -> torch.Tensor:
    """GPTQ's loss of replacing `weight` (d_out, d_in) by `approx`, per row: diag((W - Q) H (W -
    Q)ᵀ) / 2 (d_out,), with H and W as `learn.prepare` makes them (dead columns, H_cc = 0: W's
    zeroed, H_cc = 1) and H damped: the quantity `learn.assign_codes` sums in its row loss."""
    dead = (hessian.diagonal() == 0).float()  # (d_in,)
    delta = weight.float() * (1 - dead) - approx.float()  # (d_out, d_in)
    mean_diag = (hessian.diagonal() + dead).mean()
    product = delta @ hessian.float() + delta * (dead + damp * mean_diag)  # delta H', no copy of H
    return (product * delta).sum(dim=1) / 2
