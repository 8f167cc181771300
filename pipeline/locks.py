"""Advisory file locks between builders, gc and fsck (POSIX ``flock``).

``filelock`` (used for the per-key build lock) has no shared mode; readers of an entry and the
gc pass need one, so these two small context managers use ``fcntl.flock`` directly. A lock dies
with its process, so a killed builder never leaves a lock held.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def flocked(path: Path, exclusive: bool, blocking: bool = True) -> Iterator[bool]:
    """Hold ``path`` locked (shared or exclusive). Yields False, holding nothing, when
    ``blocking`` is off and another process holds a conflicting lock."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        flags = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
        try:
            fcntl.flock(fd, flags | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


@contextmanager
def shared_many(paths: list[Path]) -> Iterator[None]:
    """Shared locks on several files, taken in sorted order (no lock-order deadlock)."""
    fds = []
    try:
        for p in sorted(set(paths)):
            p.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o644)
            fds.append(fd)
            fcntl.flock(fd, fcntl.LOCK_SH)
        yield
    finally:
        for fd in fds:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
