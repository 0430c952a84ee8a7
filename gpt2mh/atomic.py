"""Atomic writes, in one place: every file and folder gpt2mh writes goes through here.

A file is written to a hidden temp file in the same folder, fsynced, renamed onto its name, and the
folder fsynced: a process killed at any moment leaves either the previous file or the new one, never
half of one. A folder (checkpoint, export) is built as a hidden temp folder beside it, then renamed
into place. Every writer refuses an output that is one of its inputs (it would be destroyed before
it is read)."""
from __future__ import annotations

import os
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


def temp_beside(path: Path) -> Path:
    # Hidden, unique, in the same folder (so the rename is atomic), ending in .tmp.
    return path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")


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
    path = Path(path)
    refuse_same(path, *inputs)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; expected a file path to write")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_beside(path)
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
    final = Path(final)
    refuse_same(final, *inputs)
    for src in inputs:
        if src is not None and Path(src).resolve().is_relative_to(final.resolve()):
            raise ValueError(f"output folder {final} holds the input {src}: replacing it would destroy the "
                             f"input before it is read; choose another output folder")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.{secrets.token_hex(4)}.{tag}")
    tmp.mkdir()  # os.mkdir honours the umask (mkdtemp would leave the folder 0700)
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                fsync_path(f)
        fsync_path(tmp)
        replace_dir(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def replace_dir(src: Path, dst: Path) -> None:
    # rename(2) cannot replace a non-empty folder: move the old one aside first, drop it after.
    src, dst = Path(src), Path(dst)
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        old = dst.with_name(f".{dst.name}.old.{secrets.token_hex(4)}.tmp")
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
