"""Data the relay writes is private to its user: folders 0700, files 0600, whatever the umask.

Stored ticks, alert rules (with their webhook URLs, which often carry a token), portfolios and
recordings are the operator's data, not the machine's: another local account must not read them.
A folder or file the relay creates gets these modes; an existing file the relay opens as its own
(a SQLite database) is tightened to 0600, an existing folder is left as the operator made it.
SQLite creates its ``-wal`` and ``-shm`` files with the database file's mode.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO, Final

__all__ = ["DIR_MODE", "FILE_MODE", "private_dir", "private_file", "open_private"]

DIR_MODE: Final = 0o700
FILE_MODE: Final = 0o600


def private_dir(path: str | os.PathLike[str]) -> Path:
    """Make ``path`` (and missing parents) if needed; each folder made here is 0700."""
    path = Path(path)
    missing = [p for p in (path, *path.parents) if not p.exists()]
    for folder in reversed(missing):
        try:
            folder.mkdir(mode=DIR_MODE)
        except FileExistsError:
            continue  # made meanwhile by someone else: theirs, as it is
        os.chmod(folder, DIR_MODE)  # mkdir's mode is filtered by the umask; chmod's is not
    return path


def private_file(path: str | os.PathLike[str]) -> Path:
    """Create ``path`` empty with mode 0600 if missing (its folder made by :func:`private_dir`), else make it 0600."""
    path = Path(path)
    private_dir(path.parent)
    fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)
    finally:
        os.close(fd)
    return path


def open_private(path: str | os.PathLike[str], *, overwrite: bool) -> BinaryIO:
    """Open ``path`` for writing, unbuffered, created 0600 (``overwrite`` False: it must not exist)."""
    path = Path(path)
    private_dir(path.parent)
    flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | (os.O_TRUNC if overwrite else os.O_EXCL)
    fd = os.open(path, flags, FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)
        return os.fdopen(fd, "wb", buffering=0)
    except BaseException:
        os.close(fd)
        raise
