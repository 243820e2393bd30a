"""sketchtune: compress a causal LM into learned sketches, then fine-tune only the sketch values."""

from .api import compress, load, load_any
from .compression import SketchConfig, compress_model
from .hub import save_sketched
from .layers import SketchLinear
from .task_sketch import apply_task_sketch, extract_task_sketch, load_task_sketch

__all__ = [
    "SketchConfig",
    "SketchLinear",
    "apply_task_sketch",
    "extract_task_sketch",
    "finetune",
    "compress",
    "compress_model",
    "load",
    "load_any",
    "load_task_sketch",
    "save_sketched",
]


def __getattr__(name: str):
    # The trainer stack (Trainer, datasets) is heavy: import it only when asked for.
    if name == "finetune":
        from .train import finetune

        return finetune
    raise AttributeError(f"module 'sketchtune' has no attribute {name!r}")
