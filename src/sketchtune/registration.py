"""Register sketchtune's quantizer with transformers without importing transformers ourselves.

`import sketchtune` must make `AutoModelForCausalLM.from_pretrained(SKETCHED_DIR)` work, but
importing transformers' quantizer machinery costs seconds that `sketchtune --help` should not pay.
So the registration runs the moment transformers has loaded `modeling_utils` (which holds
`from_pretrained` and imports the quantizer mapping), or at once if it is already loaded.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from types import ModuleType

MAPPING_MODULE = "transformers.modeling_utils"


def _register(_module: ModuleType | None = None) -> None:
    from .hf_quantizer import register

    register()


class _AfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: wraps MAPPING_MODULE's real loader to call `_register` after it."""

    def find_spec(self, fullname, path, target=None):  # importlib's signature
        if fullname != MAPPING_MODULE:
            return None
        sys.meta_path.remove(self)  # one-shot; the search below must not find us again
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        execute = spec.loader.exec_module

        def exec_module(module: ModuleType) -> None:
            execute(module)
            _register(module)

        spec.loader.exec_module = exec_module
        return spec


def install() -> None:
    """Register now if transformers' loader is loaded, else as soon as it is."""
    if MAPPING_MODULE in sys.modules:
        _register()
    elif not any(isinstance(finder, _AfterImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport())
