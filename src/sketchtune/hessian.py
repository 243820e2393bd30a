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
