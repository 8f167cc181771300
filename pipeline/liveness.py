"""Is the process that left a pin file or a temp folder in the cache still running?

A pid alone cannot say: a killed builder can linger as a zombie (no reaper in a container) and
its pid can be reused by a later process. A process is named by its pid *and* its start time,
so a pin file's name carries both (``pin_file_name``) and a temp folder, named by pid, counts
only if its process started before the folder was made. The cache store names its pin files
here and gc judges them here, so neither has to import the other.

On a build farm the cache is shared by several hosts, and a pid means nothing on another host:
pin files and temp folders carry the host's name too, and one left by another host is judged
by age alone (kept for ``FOREIGN_GRACE_S``: a build on another host may still be using it).
"""

from __future__ import annotations

import os
import re
import socket
import time
import uuid
from pathlib import Path

FOREIGN_GRACE_S = 24 * 3600.0


def host_tag() -> str:
    """This host's name as one dot-free token (names here are split on dots)."""
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:63] or "host"


def _foreign(name: str, parts_before: int) -> bool:
    """Does a ``.``-separated name carry another host's tag after its first fields?"""
    parts = name.split(".")
    return len(parts) > parts_before and parts[parts_before] != host_tag()


def _young(p: Path) -> bool:
    try:
        return time.time() - p.stat().st_mtime < FOREIGN_GRACE_S
    except FileNotFoundError:
        return False


def proc_start(pid: int) -> float | None:
    """The process's start time (seconds since the epoch); None when it is gone or a zombie, -1.0
    when it is alive but not ours to inspect."""
    import psutil

    try:
        proc = psutil.Process(pid)
        if proc.status() in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD):
            return None
        return float(proc.create_time())
    except psutil.NoSuchProcess:
        return None
    except psutil.AccessDenied:
        return -1.0  # alive, but not ours to inspect: count it as alive


def pin_file_name() -> str:
    """``<pid>.<start time in ms>.<rand>.<host>.json``: a pid reused by a later process does not match."""
    start = proc_start(os.getpid()) or 0.0
    return f"{os.getpid()}.{int(start * 1000)}.{uuid.uuid4().hex[:8]}.{host_tag()}.json"


def tmp_name(key: str) -> str:
    """A builder's temp folder name: ``<key>.<pid>.<rand>.<host>`` (judged by ``tmp_alive``)."""
    return f"{key}.{os.getpid()}.{uuid.uuid4().hex[:8]}.{host_tag()}"


def pin_alive(p: Path) -> bool:
    if _foreign(p.stem, 3):  # the stem: an old name without a host ends in ".json" there
        return _young(p)
    try:
        pid, start_ms = (int(x) for x in p.name.split(".")[:2])
    except ValueError:
        return False
    start = proc_start(pid)
    return start is not None and (start < 0 or abs(start * 1000 - start_ms) < 1000)


def tmp_alive(tmp: Path) -> bool:
    """Is the builder that owns this temp folder still running? A killed builder can linger as
    a zombie (no reaper in a container) and its pid can be reused later: neither counts."""
    if _foreign(tmp.name, 3):
        return _young(tmp)
    try:
        start = proc_start(int(tmp.name.split(".")[1]))
    except (IndexError, ValueError):
        return False
    if start is None:
        return False
    try:
        return start < 0 or start <= tmp.stat().st_mtime + 1.0  # started after the folder: reused pid
    except FileNotFoundError:
        return False
