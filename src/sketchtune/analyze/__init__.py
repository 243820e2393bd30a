"""Sketch or low rank? Compare both on a model's fine-tuning update, and on synthetic classes.

`analyze_model(AnalyzeRequest(...))` runs the whole comparison; `metrics` holds the per-matrix
error formulas, `synthetic` the model-free classes, `cli` the `sketchtune analyze` command.
Names are imported on first use, so that building the CLI parser stays light.
"""

from __future__ import annotations

from ..lazy import lazy_getattr

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

__getattr__ = lazy_getattr(__name__, _EXPORTS)
