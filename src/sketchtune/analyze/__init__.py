"""Sketch or low rank? Compare both on a model's fine-tuning update, and on synthetic classes.

`analyze_model(AnalyzeRequest(...))` runs the whole comparison; `metrics` holds the per-matrix
error formulas, `synthetic` the model-free classes, `cli` the `sketchtune analyze` command.
Names are imported on first use, so that building the CLI parser stays light.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "AnalyzeRequest": "pipeline",
    "HessianSettings": "pipeline",
    "analyze_model": "pipeline",
    "Budget": "report",
    "write_outputs": "report",
    "FinetuneSettings": "sources",
    "synthetic_table": "synthetic",
    "free_codes_approx": "metrics",
    "frozen_codes_approx": "metrics",
    "rank_errors": "metrics",
    "relative_error": "metrics",
    "sketch_errors": "metrics",
    "truncated_svd": "metrics",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
