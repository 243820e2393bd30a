"""Output folders: the user's umask, leftovers of killed runs tidied, a --force swap that never
leaves the destination empty."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from sketchtune import atomic
from sketchtune.atomic import atomic_directory, check_output_dir
from sketchtune.errors import SketchtuneError


def dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def old_output(path: Path) -> Path:
    path.mkdir()
    (path / "keep.txt").write_text("old")
    return path


def test_output_folders_get_the_umask(tmp_path):
    previous = os.umask(0o022)
    try:
        with atomic_directory(tmp_path / "out") as temp:
            (temp / "f").write_text("x")
    finally:
        os.umask(previous)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755  # mkdtemp would give 0700


def test_leftovers_of_dead_processes_are_removed_and_live_ones_kept(tmp_path):
    dead = dead_pid()
    stale_dir = tmp_path / f".out.tmp-{dead}-0a1b2c3d"
    stale_dir.mkdir()
    stale_file = tmp_path / f".out.tmp-{dead}"
    stale_file.write_text("{")
    live = tmp_path / f".out.tmp-{os.getpid()}-0a1b2c3d"  # a write in flight: not ours to touch
    live.mkdir()
    unrelated = tmp_path / f".other.tmp-{dead}-0a1b2c3d"
    unrelated.mkdir()
    check_output_dir(tmp_path / "out", force=False)
    assert not stale_dir.exists() and not stale_file.exists()
    assert live.exists() and unrelated.exists()


def test_an_old_output_set_aside_by_a_killed_swap_is_put_back(tmp_path):
    aside = old_output(tmp_path / f".out.old-{dead_pid()}")
    with pytest.raises(SketchtuneError, match="already exists"):
        check_output_dir(tmp_path / "out", force=False)  # restored first, so it exists
    assert (tmp_path / "out" / "keep.txt").read_text() == "old" and not aside.exists()


@pytest.mark.skipif(atomic._renameat2() is None, reason="no renameat2 on this system")
def test_force_replaces_in_one_exchange(tmp_path, monkeypatch):
    old_output(tmp_path / "out")

    def no_rename(self, target):
        raise AssertionError("a rename would leave a moment without an output")

    monkeypatch.setattr(Path, "rename", no_rename)
    with atomic_directory(tmp_path / "out", force=True) as temp:
        (temp / "new.txt").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["new.txt"]


def test_without_exchange_a_failed_swap_puts_the_old_output_back(tmp_path, monkeypatch):
    old_output(tmp_path / "out")
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    rename = Path.rename

    def failing(self, target):
        if ".tmp-" in self.name:
            raise OSError(28, "No space left on device")
        return rename(self, target)

    monkeypatch.setattr(Path, "rename", failing)
    with pytest.raises(SketchtuneError, match="No space left on device"):
        with atomic_directory(tmp_path / "out", force=True) as temp:
            (temp / "new.txt").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert (tmp_path / "out" / "keep.txt").read_text() == "old"
