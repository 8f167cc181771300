"""Crash- and disk-full-safe file writes, and read-only cache files.

``atomic_write_bytes`` / ``atomic_write_text`` write a hidden temp file next to the target
(``.<name>.<random>.tmp``), fsync it and ``os.replace`` it over the target: a reader sees the
old file or the new one, never half of one. On any ``OSError`` (a full disk, a read-only mount,
a permission) the temp file is removed, the previous file at the path is left as it was and an
:class:`~pipeline.errors.OutputError` with one line is raised:
``<path>: cannot write (No space left on device)``.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from pathlib import Path

from pipeline.errors import OutputError

__all__ = ["atomic_write_bytes", "atomic_write_text", "make_readonly", "TMP_MARK"]

TMP_MARK = ".tmp"  # every temp file this module creates ends with it (and starts with '.')


def _why(e: OSError) -> str:
    return e.strerror or str(e) or type(e).__name__


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable; best effort (some filesystems cannot fsync a folder)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, mode: int = 0o644) -> Path:
    """Replace ``path`` with ``data`` atomically (parent folders are created); returns the path.

    Raises :class:`OutputError` (exit 1, one line) on any OS error; the old file stays intact
    and no temp file is left behind.
    """
    path = Path(path)
    tmp: str | None = None
    fd = -1
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_MARK)
        _write_all(fd, data)
        os.fchmod(fd, mode)
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        raise OutputError(f"{path}: cannot write ({_why(e)})") from None
    finally:
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
    _fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike[str], text: str, mode: int = 0o644) -> Path:
    """:func:`atomic_write_bytes` of ``text`` encoded as UTF-8."""
    return atomic_write_bytes(path, text.encode("utf-8"), mode)


def make_readonly(path: str | os.PathLike[str]) -> None:
    """``chmod a-w``: a file loses its write bits; a folder's files (recursively) lose theirs.

    Folders themselves stay writable, so an entry can still be removed as a whole (gc,
    quarantine). Symlinks are not followed. Raises :class:`OutputError` on an OS error.
    """
    path = Path(path)
    nowrite = ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH)
    try:
        if path.is_symlink():
            return
        if path.is_dir():
            for root, _dirs, files in os.walk(path):
                for name in files:
                    f = Path(root, name)
                    if not f.is_symlink():
                        os.chmod(f, stat.S_IMODE(f.lstat().st_mode) & nowrite)
        else:
            os.chmod(path, stat.S_IMODE(path.lstat().st_mode) & nowrite)
    except OSError as e:
        raise OutputError(f"{path}: cannot make read-only ({_why(e)})") from None
