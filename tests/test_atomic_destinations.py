"""Files written through odd destinations (issue 28, class 5): an empty path, symlinks (to a file, to an
empty folder, to a previous output, dangling), a signal in the middle of a write, an error inside the
writer. A table over destination x writer (file, folder) and signal x writer with a real child process:
never a hidden temporary left behind (removed on SIGINT, swept by the next write after SIGTERM), never a
user's symlink replaced by a file or folder, every message naming the user's path, not a temporary."""
from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gpt2mh.atomic import atomic_dir, atomic_write_text

WRITERS = ["file", "folder"]


def write(kind: str, dest, text: str):
    if kind == "file":
        return atomic_write_text(dest, text)
    with atomic_dir(dest) as tmp:
        (tmp / "a.txt").write_text(text)
    return dest


def read(kind: str, dest: Path) -> str:
    return dest.read_text() if kind == "file" else (dest / "a.txt").read_text()


def hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def make(kind: str, how: str, root: Path) -> Path:
    dest = root / "out"
    if how == "symlink to previous output":
        real = root / "real"
        write(kind, real, "old")
        dest.symlink_to(real, target_is_directory=kind == "folder")
    elif how == "symlink to an empty folder":
        (root / "real").mkdir()
        dest.symlink_to(root / "real" if kind == "folder" else root / "real" / "f", target_is_directory=kind == "folder")
    elif how == "relative symlink":
        (root / "sub").mkdir()
        dest.symlink_to(Path("sub") / "t")
    return dest


DESTS = ["new path", "symlink to previous output", "symlink to an empty folder", "relative symlink"]


@pytest.mark.parametrize("kind", WRITERS)
@pytest.mark.parametrize("how", DESTS)
def test_a_symlink_stays_and_gets_the_content(tmp_path, kind, how):
    dest = make(kind, how, tmp_path)
    was_link = dest.is_symlink()
    write(kind, dest, "new")
    assert dest.is_symlink() == was_link  # never a user's link replaced by a file or folder
    assert read(kind, dest) == "new"
    for folder in {tmp_path, Path(os.path.realpath(dest)).parent}:
        assert hidden(folder) == [], hidden(folder)


@pytest.mark.parametrize("kind", WRITERS)
@pytest.mark.parametrize("bad", ["", " ", ".", "dangling"])
def test_an_empty_path_or_a_dangling_link_is_refused_by_name(tmp_path, kind, bad):
    if bad == "dangling":
        dest = tmp_path / "out"
        dest.symlink_to(tmp_path / "missing" / "x")
        match = r"out is a symlink to .*missing.*fix or remove the link"
    else:
        dest, match = bad, r"path '.*' (is empty|names no file or folder)"
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        write(kind, dest, "x")
    assert hidden(tmp_path) == []


@pytest.mark.parametrize("kind", WRITERS)
@pytest.mark.parametrize("error", ["oserror", "valueerror"])
def test_an_error_inside_the_writer_names_the_users_path(tmp_path, kind, error):
    dest = tmp_path / "out"

    def fail(where):
        if error == "oserror":
            raise OSError(errno.ENOSPC, "No space left on device", str(where))
        raise ValueError(f"cannot write {where}")

    with pytest.raises((OSError, ValueError)) as info:
        if kind == "file":
            from gpt2mh.atomic import atomic_write
            atomic_write(dest, fail)
        else:
            with atomic_dir(dest) as tmp:
                fail(tmp / "a.txt" if error == "valueerror" else tmp)
    assert str(dest) in str(info.value) and ".tmp" not in str(info.value), str(info.value)
    assert hidden(tmp_path) == []


CHILD = r"""
import sys, time
from pathlib import Path
import gpt2mh.atomic as atomic
kind, dest, marker = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
real = atomic.fsync_path
def park(path):
    if Path(path).name.startswith("."):
        marker.write_text(str(path))
        time.sleep(600)  # until the signal
    return real(path)
atomic.fsync_path = park
if kind == "file":
    atomic.atomic_write_text(dest, "child")
else:
    with atomic.atomic_dir(dest) as tmp:
        (tmp / "a.txt").write_text("child")
"""


@pytest.mark.parametrize("kind", WRITERS)
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
@pytest.mark.parametrize("how", ["new path", "symlink to previous output"])
def test_a_signal_mid_write_leaves_no_temporary_after_the_next_write(tmp_path, kind, sig, how):
    dest = make(kind, how, tmp_path)
    marker = tmp_path / "parked"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-c", CHILD, kind, str(dest), str(marker)], env=env,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while not marker.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert marker.exists(), "the child never reached the write"
    proc.send_signal(sig)
    proc.wait(60)
    real_parent = Path(os.path.realpath(dest)).parent
    if sig == signal.SIGINT:  # KeyboardInterrupt: cleaned on the way out
        assert hidden(real_parent) == [], hidden(real_parent)
    write(kind, dest, "next")  # SIGTERM killed it outright: the next write sweeps what it left
    assert hidden(real_parent) == [] and read(kind, dest) == "next" and dest.is_symlink() == (how != "new path")
