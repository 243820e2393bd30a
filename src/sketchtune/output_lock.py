"""A lock on one output, so that two processes never write it at once (two `compare`s, one -o).

The lock is a file holding its holder's PID, locked with `flock`. The kernel drops a flock when
its process dies, however it dies, so the file a killed run leaves (a dead PID in it) is simply
taken over; the PID only names the holder in the error of the process that finds it held.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import SketchtuneError

LOCK_NAME = "lock"


@contextmanager
def output_lock(folder: Path, output: str | os.PathLike) -> Iterator[None]:
    """Hold the lock in `folder` (created if need be) while `output` is written, or fail with
    one line naming the process that holds it."""
    fd = _acquire(folder / LOCK_NAME, output)
    try:
        yield
    finally:
        os.close(fd)  # the file stays: the next run takes it over


def _acquire(path: Path, output: str | os.PathLike) -> int:
    while True:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise SketchtuneError(
                f"{output} is being written by another sketchtune run ({holder}): "
                "wait for it to finish or stop it"
            ) from None
        if _still_there(fd, path):
            break
        # its holder removed the folder (its run finished) while we waited: lock the new one
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def _holder(fd: int) -> str:
    text = os.pread(fd, 32, 0).decode(errors="replace").strip()
    return f"PID {text}" if text.isdigit() else "PID not yet written"


def _still_there(fd: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False
