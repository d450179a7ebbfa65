"""Atomic file writes: a process killed mid-write leaves the previous file intact.

The new content goes to a temporary file in the destination's folder, created exclusively
under an unpredictable name (``.NAME.<random>.tmp``, as :func:`tempfile.mkstemp` makes
them), so neither two writers (threads or processes) nor a link planted in advance can
share it; it is written through the descriptor that created it, flushed, ``fsync``-ed and
renamed over the destination. While it is written it carries an exclusive ``flock``: a
temporary file of that name that nobody holds was left by a killed writer, and the next
write to the same destination removes it (on platforms without ``flock`` nothing is
removed).
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

try:
    import fcntl
except ImportError:  # Windows: no flock, so no way to tell an orphan from a live write
    fcntl = None  # type: ignore[assignment]

__all__ = ["sweep_orphans", "write_atomic", "write_atomic_stream"]

# A writer between creating its file and locking it holds an empty, unlocked file for a
# moment: such files are left alone for this long.
_FRESH_S = 5.0
# Temporary files of earlier versions (``.NAME.<pid>.tmp``) were never locked: old enough,
# nobody is writing them.
_LEGACY_S = 600.0


def _umask() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere the only way to read it is to set it
    os.umask(mask)
    return mask


def _orphan(entry: os.DirEntry[str], legacy: bool) -> bool:
    """Remove ``entry`` if it is a temporary file nobody writes; ``True`` if removed."""
    assert fcntl is not None
    try:
        fd = os.open(entry.path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return False
    try:
        st = os.fstat(fd)
        age = time.time() - st.st_mtime
        if not stat.S_ISREG(st.st_mode) or (legacy and age < _LEGACY_S) \
                or (st.st_size == 0 and age < _FRESH_S):
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False  # a live write holds it
        now = os.stat(entry.path, follow_symlinks=False)
        if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
            return False
        os.unlink(entry.path)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def sweep_orphans(path: str | os.PathLike[str]) -> int:
    """Remove the temporary files that killed writes to ``path`` left behind.

    Only files named as this module names them for ``path``, regular, and not locked by
    a live write are removed.

    Returns:
        How many were removed.
    """
    path = Path(path)
    if fcntl is None:
        return 0
    name = re.escape(path.name)
    current = re.compile(rf"\.{name}\.[a-z0-9_]{{8}}\.tmp")
    legacy = re.compile(rf"\.{name}\.\d+\.tmp")
    removed = 0
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return 0
    for entry in entries:
        if current.fullmatch(entry.name):
            removed += _orphan(entry, legacy=False)
        elif legacy.fullmatch(entry.name):
            removed += _orphan(entry, legacy=True)
    return removed


@contextlib.contextmanager
def _temporary(path: Path) -> Iterator[tuple[BinaryIO, Path]]:
    """A locked temporary file next to ``path``, renamed over it when the block succeeds."""
    sweep_orphans(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(name)
    f = os.fdopen(fd, "wb")
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        if hasattr(os, "fchmod"):  # mkstemp makes it private; keep the usual permissions
            os.fchmod(fd, 0o666 & ~_umask())
        yield f, tmp
        f.flush()
        os.fsync(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        f.close()
    if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable (POSIX)
        dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def write_atomic_stream(path: str | os.PathLike[str],
                        write: Callable[[BinaryIO], None]) -> Path:
    """Call ``write(f)`` on a new temporary file next to ``path``, then rename it over
    ``path``; a crash at any point leaves either the previous file or the complete new one.

    Args:
        path: The destination.
        write: Writes the whole content to the binary file it is given.

    Returns:
        ``path``, as a :class:`~pathlib.Path`.

    Raises:
        OSError: when the file cannot be created or written (disk full, permissions); the
            temporary file is removed and ``path`` is unchanged.
    """
    path = Path(path)
    with _temporary(path) as (f, _):
        write(f)
    return path


def write_atomic(path: str | os.PathLike[str], write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary file next to ``path``, fsync it, rename it over
    ``path``; for writers that take a file name (prefer :func:`write_atomic_stream`).

    A crash at any point leaves either the previous file or the complete new one.

    Args:
        path: The destination.
        write: Writes the whole content to the path it is given (the file exists, empty).

    Returns:
        ``path``, as a :class:`~pathlib.Path`.
    """
    path = Path(path)
    with _temporary(path) as (_, tmp):
        write(tmp)
        # The writer may have replaced the file rather than written into it: sync by name.
        with open(tmp, "rb+") as g:
            os.fsync(g.fileno())
    return path
