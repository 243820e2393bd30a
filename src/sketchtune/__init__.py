"""sketchtune: compress a causal LM into learned sketches, then fine-tune only the sketch values."""

from .lazy import lazy_getattr
from .registration import install as _install_quantizer

# Public name -> the module that defines it. Imported on first use: transformers, datasets and the
# trainer stack take seconds to import, and `sketchtune --help` or a bad option should not wait.
_EXPORTS = {
    "SketchConfig": "compression",
    "SketchLinear": "layers",
    "apply_task_sketch": "task_sketch",
    "compress": "api",
    "compress_model": "compression",
    "extract_task_sketch": "task_sketch",
    "finetune": "train",
    "load": "api",
    "load_any": "api",
    "load_task_sketch": "task_sketch",
    "save_sketched": "hub",
    "save_task_sketch": "task_sketch",
}

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_getattr(__name__, _EXPORTS)

_install_quantizer()  # AutoModelForCausalLM.from_pretrained reads sketched folders from here on
