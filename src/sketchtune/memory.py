"""Process memory figures for results files."""

from __future__ import annotations

import resource
import sys


def peak_rss_bytes() -> int:
    """The highest resident set size this process has reached so far."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB
