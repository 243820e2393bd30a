"""Process memory figures for results files."""

from __future__ import annotations

import ctypes
import functools
import os
import resource
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def peak_rss_bytes() -> int:
    """The highest resident set size this process has reached so far."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


def resident_bytes() -> int:
    """This process's resident set size now (Linux: /proc/self/statm)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def high_water_bytes() -> int:
    """The peak resident size since the process started or since `reset_high_water` (Linux
    VmHWM)."""
    status = Path("/proc/self/status").read_text().splitlines()
    return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM"))


def reset_high_water() -> None:
    """Restart the high-water mark (VmHWM, and with it getrusage's peak) from the current resident
    size (Linux: /proc/self/clear_refs), so that a later read measures one phase."""
    Path("/proc/self/clear_refs").write_text("5")


def storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind `tensors`: tied weights and views count once."""
    sizes = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(sizes.values())


def release_free_heap() -> None:
    """Hand freed heap pages back to the OS (glibc's malloc_trim; elsewhere nothing). Between
    compression blocks this keeps the resident size near what is live, not what was ever used."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


@contextmanager
def large_buffers_off_the_heap(threshold: int = 1 << 20) -> Iterator[None]:
    """Inside the block, serve every allocation of `threshold` bytes or more by mmap, so that
    freeing one returns it to the OS at once (glibc's mallopt; elsewhere nothing). glibc otherwise
    raises its mmap threshold (up to 32 MiB) each time such a block is freed, and compression's
    MB-sized temporaries then pile up in a heap that malloc_trim cannot always shrink. Afterwards
    the threshold stays at that 32 MiB ceiling, where a long-running torch process's threshold ends
    up anyway (glibc cannot be handed its own adjustment back): left at 1 MiB, every training step
    would pay fresh pages for its tensors (SmolLM2 steps 20-40% slower)."""
    libc = _glibc()
    if libc is None:
        yield
        return
    libc.mallopt(_M_MMAP_THRESHOLD, threshold)
    try:
        yield
    finally:
        libc.mallopt(_M_MMAP_THRESHOLD, _DYNAMIC_MMAP_CEILING)


_M_MMAP_THRESHOLD = -3  # glibc's malloc.h
_DYNAMIC_MMAP_CEILING = 32 << 20  # glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim  # noqa: B018 - absent in musl
    except (OSError, AttributeError):
        return None
    return libc
