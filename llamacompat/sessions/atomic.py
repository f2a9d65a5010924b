"""Atomic file writes: a temporary file in the target's folder, fsync, rename.

A crash, a full disk or a failed writer leaves the previous file at the target
path exactly as it was; readers only ever see the old file or the new one.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from typing import Callable

__all__ = ["atomic_write", "atomic_write_bytes"]


def atomic_write(path: str, write: Callable[[str], None]) -> None:
    """Have ``write(tmp_path)`` create the file, then make it durable and move it to ``path``.

    ``write`` gets a path (not a file object) because native savers such as
    ``llama_state_save_file`` open the file themselves. New files are private
    to the user (0600: sessions hold conversation state); a replaced file keeps
    its mode. Raises ``OSError`` (the target untouched) on any failure.
    """
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        write(tmp)
        with contextlib.suppress(FileNotFoundError):
            os.chmod(tmp, stat.S_IMODE(os.stat(path).st_mode))
        _fsync(tmp, os.O_RDONLY)  # a full disk can surface only here, with delayed allocation
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # not every filesystem can fsync a folder
        _fsync(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    atomic_write(path, write)


def _fsync(path: str, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
