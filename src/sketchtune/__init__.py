"""sketchtune: compress a causal LM into learned sketches, then fine-tune only the sketch values."""

from .api import compress, load_any
from .compression import SketchConfig, compress_model
from .hub import load, save_sketched
from .layers import SketchLinear

__all__ = [
    "SketchConfig",
    "SketchLinear",
    "compress",
    "compress_model",
    "load",
    "load_any",
    "save_sketched",
]
