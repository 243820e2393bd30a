"""The C++ CPU kernels: built on first use with torch's extension machinery, then cached.

Loading registers the `sketchtune::lut_linear` op (with its autograd), its two gradient ops,
`sketchtune::bf16_linear` (a dense bf16 GEMV, for inference) and `sketchtune::decode_layer` (one
decoder layer for one new token, `fast_decode`); this module adds their shape functions so that
torch.compile can trace them.
"""

from __future__ import annotations

import platform
import warnings
from pathlib import Path

import torch

from ...cache import cache_dir

SOURCES = ("ops.cpp", "decode_layer.cpp", "isa_scalar.cpp", "isa_avx2.cpp", "isa_avx512.cpp",
           "isa_emu16.cpp")
FAST_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_loaded: bool | None = None


def build_directory() -> Path:
    """`kernels/<machine>-torch<version>` under the cache folder (`cache.cache_dir`)."""
    folder = cache_dir() / "kernels" / f"{platform.machine()}-torch{torch.__version__}"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def available() -> bool:
    """Build (first time) and load the kernels; False, after one warning, if that fails.
    `kernels.compute_path("reference")` (or `SKETCHTUNE_KERNELS=reference`) never asks."""
    global _loaded
    if _loaded is None:
        _loaded = _load()
    return _loaded


def isa(request: str = "") -> str:
    """The instruction set the kernels use; a name ("avx512", "avx2", "emu16", "scalar",
    "best") switches to it (through `kernels.set_compute_path`). Raises RuntimeError if that one
    cannot run here."""
    return torch.ops.sketchtune.cpu_isa(request)


def _load() -> bool:
    from torch.utils import cpp_extension

    here = Path(__file__).parent
    try:
        cpp_extension.load(
            name="sketchtune_cpu",
            sources=[str(here / name) for name in SOURCES],
            extra_include_paths=[str(here)],
            extra_cflags=["-O3", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            build_directory=str(build_directory()),
            is_python_module=False,
            verbose=False,
        )
    except Exception as exc:  # no compiler, failed build: the reference path still works
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        warnings.warn(
            f"sketchtune: fast CPU kernels unavailable ({reason}); using the reference path",
            RuntimeWarning,
            stacklevel=3,
        )
        return False
    _register_fake_kernels()
    return True


def _register_fake_kernels() -> None:
    @torch.library.register_fake("sketchtune::lut_linear")
    def _(x, codes, values, bits):
        return x.new_empty((*x.shape[:-1], codes.shape[0]))

    @torch.library.register_fake("sketchtune::lut_linear_input_grad")
    def _(grad_out, codes, values, bits):
        return grad_out.new_empty((*grad_out.shape[:-1], codes.shape[1] * 8 // bits))

    @torch.library.register_fake("sketchtune::lut_linear_values_grad")
    def _(grad_out, x, codes, values, bits):
        return values.new_empty(values.shape)

    @torch.library.register_fake("sketchtune::decode_layer")
    def _(x, norm_in, norm_post, eps, codes, values, bits, biases, keys, vals, pos, cos, sin,
          heads, scaling):
        return x.new_empty(x.shape)

    @torch.library.register_fake("sketchtune::bf16_linear")
    def _(x, weight):
        return x.new_empty((*x.shape[:-1], weight.shape[0]))
