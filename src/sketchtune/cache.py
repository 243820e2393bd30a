"""Where sketchtune keeps what it makes once and reuses (converted models, built kernels)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """`$SKETCHTUNE_CACHE`, else `~/.cache/sketchtune`."""
    root = os.environ.get("SKETCHTUNE_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "sketchtune"
