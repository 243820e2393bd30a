"""Triton kernels for sketched layers on GPUs: the CUDA side of the sketchtune ops.

Modules, one job each: `tiles` (device helpers: unpack codes, look weights up, tile order),
`gemv` (decode, 1..8 rows), `gemm` (fused dequantize + GEMM), `input_grad` (dX = dY Ŵ),
`values_grad` (dŴ binned by code tile by tile), `launch` (host-side checks and dtypes), `ops`
(registration as the ops' CUDA kernels, autograd). This package itself imports triton only when
asked to run, so sketchtune works without it.
"""

from __future__ import annotations

import warnings

import torch

FAST_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_available: bool | None = None


def available() -> bool:
    """Whether triton imports; False (after one warning if it is installed but broken) if not."""
    global _available
    if _available is None:
        try:
            import triton  # noqa: F401
        except ModuleNotFoundError:
            _available = False
        except Exception as exc:  # installed but broken: the reference path still works
            warnings.warn(
                f"sketchtune: triton unavailable ({type(exc).__name__}: {exc}); "
                "using the reference path on GPUs",
                RuntimeWarning,
                stacklevel=3,
            )
            _available = False
        else:
            _available = True
    return _available


def lut_linear(
    x: torch.Tensor, codes: torch.Tensor, values: torch.Tensor, bits: int
) -> torch.Tensor:
    """y = x Ŵᵀ on the Triton kernels, with autograd (see `ops.lut_linear`)."""
    from .ops import lut_linear

    return lut_linear(x, codes, values, bits)
