"""Output locations: checked before any work, written to a hidden temp sibling, then put in place.

A failed or killed write leaves the old output (or nothing) at the destination. Temp siblings are
named `.NAME.tmp-PID-...` and set-aside outputs `.NAME.old-PID`, so the next run for the same
destination can tell the leftovers of a dead process from a live one's and tidy them (`recover`).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import json
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import SketchtuneError, first_line

TEMP, OLD = "tmp", "old"
_AT_FDCWD = -100  # Linux: paths relative to the working directory
_RENAME_EXCHANGE = 2


def check_output_dir(path: str | os.PathLike, force: bool) -> Path:
    """Fail early, before any long work, when the output folder exists and `force` is off, or
    when nothing can be written there. Tidies what killed runs left for this destination."""
    target = Path(path)
    recover(target)
    if target.exists() and not force:
        raise SketchtuneError(f"output folder {target} already exists (use --force to replace it)")
    if target.exists() and not target.is_dir():
        raise SketchtuneError(f"output path {target} exists and is not a folder")
    check_writable(target)
    return target


def check_output_file(path: str | os.PathLike) -> Path:
    """As `check_output_dir`, for a file that is simply replaced (a results JSON)."""
    target = Path(path)
    recover(target)
    if target.is_dir():
        raise SketchtuneError(f"output {target} is a folder; give a file name")
    check_writable(target)
    return target


def check_writable(target: Path) -> None:
    """The nearest existing folder above `target` must be one we may create entries in."""
    place = target.parent
    while not place.exists() and place != place.parent:
        place = place.parent
    if not place.is_dir():
        raise SketchtuneError(f"cannot write {target}: {place} is a file, not a folder")
    if not os.access(place, os.W_OK | os.X_OK):
        raise SketchtuneError(f"cannot write {target}: {place} is not writable")


def recover(target: Path) -> None:
    """Undo what a killed write of `target` left: put back an old output that a swap set aside
    and never replaced, and remove temp siblings whose process is gone."""
    try:
        siblings = list(target.parent.iterdir())
    except OSError:  # no parent folder yet, or one we cannot list: nothing of ours to tidy
        return
    pattern = re.compile(rf"\.{re.escape(target.name)}\.({TEMP}|{OLD})-(\d+)(-[0-9a-f]+)?")
    for sibling in siblings:
        match = pattern.fullmatch(sibling.name)
        if match is None or _alive(int(match[2])):
            continue
        with contextlib.suppress(OSError):  # tidying only: the run itself may still succeed
            if match[1] == OLD and not target.exists():
                sibling.rename(target)
            elif sibling.is_dir():
                shutil.rmtree(sibling)
            else:
                sibling.unlink()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def write_error(target: Path, exc: OSError) -> SketchtuneError:
    """An OS error while writing `target` (disk full, permissions) as one line."""
    kept = "; the previous output is unchanged" if target.exists() else ""
    return SketchtuneError(f"could not write {target}: {exc.strerror or first_line(exc)}{kept}")


@contextmanager
def atomic_directory(path: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yield a temp folder; on success it replaces `path`, on any failure it is removed."""
    target = check_output_dir(path, force)
    temp = target.with_name(f".{target.name}.{TEMP}-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        temp.mkdir()  # not tempfile.mkdtemp: its folders are 0700, outputs get the user's umask
        yield temp
        _swap_in(temp, target)
    except OSError as exc:
        raise write_error(target, exc) from None
    finally:
        shutil.rmtree(temp, ignore_errors=True)  # after an exchange it holds the old output


def _swap_in(temp: Path, target: Path) -> None:
    """Put `temp` at `target`. An existing output is exchanged with it in one step where the
    system can, so one of the two is in place at every instant; elsewhere the old one is set
    aside first, and `recover` puts it back if this process dies before the new one is in."""
    if not target.exists():
        temp.rename(target)
    elif not _exchange(temp, target):
        old = target.with_name(f".{target.name}.{OLD}-{os.getpid()}")
        target.rename(old)
        try:
            temp.rename(target)
        except OSError:
            old.rename(target)
            raise
        shutil.rmtree(old, ignore_errors=True)


@functools.cache
def _renameat2():
    return getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2); False where the system or filesystem can't."""
    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def write_json_atomic(path: str | os.PathLike, payload: object) -> Path:
    """Write JSON next to its final name, then rename: readers never see half a file."""
    target = check_output_file(path)
    text = json.dumps(payload, indent=2) + "\n"
    temp = target.with_name(f".{target.name}.{TEMP}-{os.getpid()}")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        temp.write_text(text)
        os.replace(temp, target)
    except OSError as exc:
        with contextlib.suppress(OSError):
            temp.unlink(missing_ok=True)
        raise write_error(target, exc) from None
    return target
