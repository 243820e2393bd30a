"""The lock on `<output>.run/`: one writer per output; a dead holder's lock is taken over."""

import os
import subprocess
import sys

from sketchtune.cli import main
from sketchtune.output_lock import LOCK_NAME, output_lock

HOLD = (
    "import sys\nfrom pathlib import Path\nfrom sketchtune.output_lock import output_lock\n"
    "with output_lock(Path(sys.argv[1]), 'out'):\n"
    "    print('held', flush=True)\n"
    "    sys.stdin.read()\n"
)


def hold_lock(folder):
    """A process holding the lock on `folder` until its stdin closes (or it is killed)."""
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "held\n"
    return holder


def test_a_second_compare_on_one_output_fails_naming_the_first(tmp_path, capsys):
    out = tmp_path / "cmp"
    holder = hold_lock(tmp_path / "cmp.run")
    try:
        code = main(["compare", "m", "--data", "gsm8k", "--task", "ARC-Easy",
                     "--methods", "dense", "-o", str(out)])
    finally:
        holder.communicate("")
    assert code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert f"PID {holder.pid}" in lines[0] and str(out) in lines[0]
    assert not out.exists()
    with output_lock(tmp_path / "cmp.run", out):  # released when its holder ended
        pass


def test_the_lock_of_a_killed_holder_is_taken_over(tmp_path):
    folder = tmp_path / "cmp.run"
    holder = hold_lock(folder)
    holder.kill()
    holder.communicate()
    assert (folder / LOCK_NAME).read_text() == f"{holder.pid}\n"  # left behind, PID dead
    with output_lock(folder, tmp_path / "cmp"):
        assert (folder / LOCK_NAME).read_text() == f"{os.getpid()}\n"


def test_a_lock_file_naming_a_dead_pid_is_taken_over(tmp_path):
    folder = tmp_path / "cmp.run"
    folder.mkdir()
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout
    (folder / LOCK_NAME).write_text(gone)
    with output_lock(folder, tmp_path / "cmp"), output_lock(tmp_path / "other.run", "other"):
        assert (folder / LOCK_NAME).read_text() == f"{os.getpid()}\n"  # one lock per output
