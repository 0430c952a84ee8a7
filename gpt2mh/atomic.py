"""Atomic writes, in one place: every file and folder gpt2mh writes goes through here.

A file is written to a hidden temp file in the same folder, fsynced, renamed onto its name, and the
folder fsynced: a process killed at any moment leaves either the previous file or the new one, never
half of one. A folder (checkpoint, export) is built as a hidden temp folder beside it, then renamed
into place. Every writer refuses an output that is one of its inputs (it would be destroyed before
it is read).

Odd destinations: an empty path is refused; a symlink the user made stays a symlink (the new content goes
where it points; a dangling one is refused), never silently replaced by a file or folder. A temporary is
named after the writing process (`.NAME.PID-RANDOM.tmp`): SIGINT and errors remove it on the way out; one
left by a process that was killed outright (SIGTERM's default, SIGKILL) is swept by the next write to the
same destination. Messages name the user's path, never a temporary."""
from __future__ import annotations

import os
import re
import secrets
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator


def refuse_same(out, *inputs, what: str = "output") -> None:
    """An output path that names one of the inputs (same file, also through a link) is refused."""
    out = Path(out)
    for src in inputs:
        if src is None:
            continue
        src = Path(src)
        same = out.resolve() == src.resolve() or (out.exists() and src.exists() and os.path.samefile(out, src))
        if same:
            raise ValueError(f"{what} {out} is the input file {src}: writing it would destroy the input "
                             f"before it is read; choose another output path")


def temp_beside(path: Path, tag: str = "tmp") -> Path:
    # Hidden, unique, in the same folder (so the rename is atomic), named after this process (see `sweep`).
    return path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(6)}.{tag}")


def destination(path, what: str = "output") -> Path:
    """The path a writer writes: `path` itself, or where a symlink the user made points (the link stays)."""
    if isinstance(path, (str, os.PathLike)) and not str(path).strip():
        raise ValueError(f"{what} path {str(path)!r} is empty: give a file or folder name")
    path = Path(path)
    if path.name in ("", ".", ".."):
        raise ValueError(f"{what} path {str(path)!r} names no file or folder: give one")
    if path.is_symlink():
        target = Path(os.path.realpath(path))
        if not target.parent.is_dir():
            raise FileNotFoundError(f"{what} {path} is a symlink to {os.readlink(path)}, whose folder does not "
                                    f"exist: fix or remove the link")
        return target
    return path


_TEMP = re.compile(r"^\.(?P<name>.+)\.(?:old\.)?(?P<pid>\d+)-[0-9a-f]+\.[a-z]+$")


def sweep(path: Path) -> None:
    """Remove the temporaries a killed process left beside `path` (their pid no longer runs)."""
    try:
        entries = list(path.parent.iterdir())
    except OSError:
        return
    for p in entries:
        m = _TEMP.match(p.name)
        if not m or m.group("name") != path.name or _alive(int(m.group("pid"))):
            continue
        if ".old." in p.name and not path.exists():
            continue  # the previous output, moved aside by a writer killed before the new one went in
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def user_path_error(e: BaseException, tmp: Path, path: Path) -> BaseException:
    """`e` with the temporary's name replaced by the user's path (OSError keeps its errno and type)."""
    if isinstance(e, OSError):
        out = type(e)(e.errno, e.strerror or str(e), str(path)) if e.errno else type(e)(str(e).replace(str(tmp), str(path)))
        return out
    text = str(e)
    if str(tmp) in text or tmp.name in text:
        try:
            return type(e)(text.replace(str(tmp), str(path)).replace(tmp.name, path.name))
        except Exception:
            return e
    return e


def fsync_path(path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path, write: Callable[[str], None], inputs=()) -> Path:
    """Call `write(temp_name)` to produce the file, then fsync and rename it onto `path`.

    The temp file is created first with mode 0o666 & ~umask (not mkstemp's 0600, which would stick
    to the result); a writer that creates its own file (safetensors, torch.save) keeps that mode."""
    given = path
    path = destination(path)
    refuse_same(path, *inputs)
    if path.is_dir():
        raise IsADirectoryError(f"{given} is a folder; expected a file path to write")
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep(path)
    tmp = temp_beside(path)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        mode = os.fstat(fd).st_mode & 0o777
        os.close(fd)
        try:
            write(str(tmp))
            os.chmod(tmp, mode)
            fsync_path(tmp)
            os.replace(tmp, path)
            fsync_path(path.parent)
        finally:
            if tmp.exists():
                tmp.unlink()
    except Exception as e:
        err = user_path_error(e, tmp, Path(given))
        if err is e:
            raise
        raise err from None
    return path


def atomic_write_bytes(path, data: bytes, inputs=()) -> Path:
    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(data)

    return atomic_write(path, write, inputs)


def atomic_write_text(path, text: str, inputs=()) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"), inputs)


def atomic_save_file(tensors: dict, path, metadata: dict | None = None, inputs=()) -> Path:
    """safetensors.torch.save_file, atomically."""
    from safetensors.torch import save_file

    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata), inputs)


def atomic_torch_save(obj, path, inputs=()) -> Path:
    import torch

    return atomic_write(path, lambda tmp: torch.save(obj, tmp), inputs)


@contextmanager
def atomic_dir(final, inputs=(), tag: str = "tmp") -> Iterator[Path]:
    """Build a folder in a hidden temp folder beside `final`; on success it replaces `final` (an old
    one is moved aside first, then deleted); on any error the temp folder is removed."""
    final = destination(final, "output folder")
    refuse_same(final, *inputs)
    for src in inputs:
        if src is not None and Path(src).resolve().is_relative_to(final.resolve()):
            raise ValueError(f"output folder {final} holds the input {src}: replacing it would destroy the "
                             f"input before it is read; choose another output folder")
    final.parent.mkdir(parents=True, exist_ok=True)
    sweep(final)
    tmp = temp_beside(final, tag)
    tmp.mkdir()  # os.mkdir honours the umask (mkdtemp would leave the folder 0700)
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                fsync_path(f)
        fsync_path(tmp)
        replace_dir(tmp, final)
    except Exception as e:
        err = user_path_error(e, tmp, final)
        if err is e:
            raise
        raise err from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def replace_dir(src: Path, dst: Path) -> None:
    # rename(2) cannot replace a non-empty folder: move the old one aside first, drop it after.
    src, dst = Path(src), Path(dst)
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        old = dst.with_name(f".{dst.name}.old.{os.getpid()}-{secrets.token_hex(4)}.tmp")
        os.rename(dst, old)
        os.rename(src, dst)
        fsync_path(dst.parent)
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink()
    else:
        os.replace(src, dst)
        fsync_path(dst.parent)
