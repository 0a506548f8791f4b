"""Crash-safe writes: every file and folder the project writes appears whole or not at all.

A writer fills a temporary sibling (``.NAME.tmp...``), fsyncs it, renames it over the target and
fsyncs the parent folder, so a crash (even SIGKILL or power loss) leaves the old version or the
new one, never half of either. Temporary siblings left by a killed writer are removed by
`clean_stale_temps` when the next run starts.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

TMP_MARK = ".tmp"


def fsync_path(path: str | os.PathLike) -> None:
    """fsync a file, or every file under a folder and the folder itself."""
    path = Path(path)
    if path.is_dir():
        for child in path.rglob("*"):
            if child.is_file():
                _fsync_fd(child, os.O_RDONLY)
        _fsync_dir(path)
    else:
        _fsync_fd(path, os.O_RDONLY)


def _fsync_fd(path: Path, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    # Directories cannot be opened for fsync on every platform; where they can, the rename is
    # only durable once the parent's entry is on disk.
    try:
        _fsync_fd(path, os.O_RDONLY)
    except OSError:
        pass  # e.g. Windows: directory handles cannot be fsynced, and renames are journaled there


def write_atomic(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` to fill a temporary file beside ``path``, then move it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_MARK, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        fsync_path(tmp)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    write_atomic(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    write_atomic(path, lambda tmp: Path(tmp).write_bytes(data))


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``path``; on success it replaces ``path`` whole.

    The old folder (if any) is moved aside before the rename and deleted after it, so at every
    instant either the old or the new folder is complete under some name. On error the temporary
    folder is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}{TMP_MARK}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        fsync_path(tmp)
        old = path.with_name(f".{path.name}.old{TMP_MARK}")
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)
            path.rename(old)
        tmp.rename(path)
        _fsync_dir(path.parent)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def clean_stale_temps(folder: str | os.PathLike) -> list[str]:
    """Remove temporary siblings (``.NAME...tmp``) left in ``folder`` by a killed writer; returns their names.

    Call it only where this process owns the folder's writes (start of a run, before any writer).
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for child in folder.iterdir():
        if child.name.startswith(".") and child.name.endswith(TMP_MARK):
            if child.is_dir():
                shutil.rmtree(child, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    child.unlink()
            removed.append(child.name)
    return removed
