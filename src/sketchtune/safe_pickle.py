"""Read a pickle of torch tensors without running anything it names beyond rebuilding tensors.

`pickle.dump` of a dict of CPU tensors (torch 2.13) emits, per tensor,
  torch._utils._rebuild_tensor_v2(torch.storage._load_from_bytes(B), offset, size, stride,
                                  requires_grad, collections.OrderedDict())
where B is a legacy `torch.save` of the storage; protocols 0-2 also spell B as
`_codecs.encode(text, "latin1")`. Those four names are the only globals admitted, each mapped to
a checking function of ours: the storage bytes go through `torch.load(..., weights_only=True)`,
never through torch's own `_load_from_bytes` (which calls `torch.load(weights_only=False)`).
Any other global, and any persistent id (plain pickles have none), is refused with one line.
"""

from __future__ import annotations

import io
import os
import pickle
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import torch

from .errors import SketchtuneError

ZIP_MAGIC = b"PK\x03\x04"


def _latin1_bytes(text: object, encoding: object = "utf-8") -> bytes:
    """`_codecs.encode` as protocols 0-2 use it for bytes objects, and nothing else."""
    if not isinstance(text, str) or encoding != "latin1":
        raise SketchtuneError("the pickle calls _codecs.encode other than for bytes: refused")
    return text.encode("latin1")


def _torch_reason(exc: BaseException) -> str:
    """The informative line of a torch.load error (its first line is generic advice)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    useful = [line for line in lines if not line.startswith(("Weights only load failed", "Check "))]
    return (useful or lines or [type(exc).__name__])[0]


def _load_storage(data: object) -> torch.storage.TypedStorage:
    """One storage from its legacy `torch.save` bytes, read with torch's weights-only loader."""
    if not isinstance(data, bytes):
        raise SketchtuneError("a tensor storage in the pickle is not given as bytes: refused")
    try:
        storage = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, ... for bad payloads
        raise SketchtuneError(
            f"a tensor storage in the pickle is not a plain torch storage: {_torch_reason(exc)}"
        ) from None
    if type(storage) is not torch.storage.TypedStorage:
        raise SketchtuneError(
            f"a tensor storage in the pickle holds a {type(storage).__name__}: refused"
        )
    return storage


def _is_int_tuple(value: object) -> bool:
    return isinstance(value, tuple) and all(type(v) is int and v >= 0 for v in value)


def _rebuild_tensor(
    storage: object, offset: object, size: object, stride: object, requires_grad: object,
    hooks: object, metadata: object = None,
) -> torch.Tensor:
    """`torch._utils._rebuild_tensor_v2` for plain tensors, with every argument checked and
    the view kept inside its storage (`set_` would silently grow a storage that is too small)."""
    if (
        type(storage) is not torch.storage.TypedStorage
        or type(offset) is not int or offset < 0
        or not _is_int_tuple(size) or not _is_int_tuple(stride) or len(size) != len(stride)
        or type(requires_grad) is not bool
        or not isinstance(hooks, dict) or hooks or metadata
    ):
        raise SketchtuneError("a tensor in the pickle is not a plain tensor: refused")
    untyped = storage._untyped_storage
    last = sum((n - 1) * s for n, s in zip(size, stride, strict=True))  # element offset
    extent = offset + last + 1 if all(size) else 0
    if extent * storage.dtype.itemsize > untyped.nbytes():
        raise SketchtuneError("a tensor in the pickle reaches past the end of its storage")
    return torch.empty(0, dtype=storage.dtype).set_(untyped, offset, size, stride)


ALLOWED: dict[tuple[str, str], Callable] = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch.storage", "_load_from_bytes"): _load_storage,
    ("collections", "OrderedDict"): OrderedDict,
    ("_codecs", "encode"): _latin1_bytes,
}


class TensorUnpickler(pickle.Unpickler):
    """Unpickles containers and plain torch tensors; refuses every other global."""

    def find_class(self, module: str, name: str) -> Callable:
        allowed = ALLOWED.get((module, name))
        if allowed is None:
            raise SketchtuneError(
                f"the pickle asks for {module}.{name}, which a file of tensors never needs: "
                "refused, nothing in it was run"
            )
        return allowed

    def persistent_load(self, pid: object) -> object:
        raise SketchtuneError("the pickle holds persistent ids (not a plain pickle.dump): refused")


def load_tensor_pickle(path: str | os.PathLike) -> object:
    """The object a plain `pickle.dump` of tensors wrote to `path`; one error line otherwise."""
    path = Path(path)
    if not path.is_file():
        raise SketchtuneError(f"{path} is not a file")
    with path.open("rb") as handle:
        if handle.read(len(ZIP_MAGIC)) == ZIP_MAGIC:
            raise SketchtuneError(f"{path} is a zip archive (torch.save?), not a pickle")
        handle.seek(0)
        try:
            return TensorUnpickler(handle).load()
        except SketchtuneError as exc:
            raise SketchtuneError(f"{path}: {exc}") from None
        except Exception as exc:  # pickle raises many types for damaged or foreign files
            reason = (str(exc).strip().splitlines() or [""])[0]
            raise SketchtuneError(
                f"{path} is not a readable pickle: {type(exc).__name__}: {reason}"
            ) from None
