"""Atomic outputs: everything is written to a hidden temp sibling, then renamed into place."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import SketchtuneError


def check_output_dir(path: str | os.PathLike, force: bool) -> Path:
    """Fail early, before any long work, when the output folder exists and `force` is off."""
    target = Path(path)
    if target.exists() and not force:
        raise SketchtuneError(f"output folder {target} already exists (use --force to replace it)")
    if target.exists() and not target.is_dir():
        raise SketchtuneError(f"output path {target} exists and is not a folder")
    return target


@contextmanager
def atomic_directory(path: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yield a temp folder; on success it replaces `path`, on any failure it is removed."""
    target = check_output_dir(path, force)
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield temp
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        target.rename(old)
        temp.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        temp.rename(target)


def write_json_atomic(path: str | os.PathLike, payload: object) -> Path:
    """Write JSON next to its final name, then rename: readers never see half a file."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    temp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(temp, target)
    return target
