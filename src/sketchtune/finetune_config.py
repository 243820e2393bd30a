"""`FinetuneConfig`: the fine-tuning settings, apart from `train` so the CLI can offer them
without importing transformers."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from .checkpointing import FULL_ABOVE
from .cliargs import option, positive_int
from .errors import SketchtuneError


@dataclass
class FinetuneConfig:
    """Training settings; defaults suit short runs on small models (sweep `lr` for yours)."""

    epochs: float = option(1.0, "passes over the training data")
    max_steps: int = option(-1, "optimizer steps; overrides --epochs when positive")
    lr: float = option(1e-4, "peak learning rate (AdamW, linear schedule)")
    batch_size: int = option(8, "sequences per step and process", type=positive_int)
    grad_accum: int = option(1, "gradient accumulation steps", type=positive_int)
    seq_len: int = option(512, "longest training sequence in tokens", type=positive_int)
    warmup: int | None = option(None, "warm-up steps (default: 10% of the run, <= 100)")
    seed: int = option(42, "random seed")
    save_steps: int = option(50, "checkpoint interval", type=positive_int)
    logging_steps: int = 5
    lr_schedule: Literal["linear", "constant"] = "linear"  # after warm-up
    checkpoints: bool = True  # every save_steps, for resuming; off for throwaway runs
    max_grad_norm: float = 1.0  # 0 disables clipping
    weight_decay: float = 0.0
    gradient_checkpointing: Literal["auto", "off", "selective", "full"] = option("auto", (
        "what each block keeps for the backward: off (everything), selective (matmul and "
        "attention outputs; norms and activations are recomputed), full (its input; the whole "
        f"block is recomputed); auto: full above {FULL_ABOVE:.0e} weights, else selective"
    ))
    bf16: bool | None = option(None, (
        "bf16 autocast: dense and sketched matmuls in bf16 (fp32 accumulation), values kept as "
        "fp32 masters; default: on CUDA and on CPUs with native bf16 (avx512_bf16 or amx_bf16)"
    ))
    limit: int | None = option(None, "use at most this many training examples", type=positive_int)

    def __post_init__(self) -> None:
        for bad, message in self._problems():
            if bad:
                raise SketchtuneError(message)

    def _problems(self) -> list[tuple[bool, str]]:
        def positive(x: float) -> bool:
            return math.isfinite(x) and x > 0

        return [
            (not positive(self.lr), f"--lr must be a positive number, not {self.lr}"),
            (not positive(self.epochs), f"--epochs must be a positive number, not {self.epochs}"),
            (self.max_steps == 0 or self.max_steps < -1,
             f"--max-steps must be positive (or -1: run --epochs), not {self.max_steps}"),
            (self.warmup is not None and self.warmup < 0,
             f"--warmup must be 0 or more steps, not {self.warmup}"),
            (self.batch_size <= 0, f"--batch-size must be positive, not {self.batch_size}"),
            (self.grad_accum <= 0, f"--grad-accum must be positive, not {self.grad_accum}"),
            (self.seq_len <= 1, f"--seq-len must be at least 2, not {self.seq_len}"),
            (self.save_steps <= 0, f"--save-steps must be positive, not {self.save_steps}"),
            (self.logging_steps <= 0, f"logging_steps must be positive, not {self.logging_steps}"),
        ]
