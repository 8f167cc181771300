"""Is the process that left a pin file or a temp folder in the cache still running?

A pid alone cannot say: a killed builder can linger as a zombie (no reaper in a container) and
its pid can be reused by a later process. A process is named by its pid *and* its start time,
so a pin file's name carries both (``pin_file_name``) and a temp folder, named by pid, counts
only if its process started before the folder was made. The cache store names its pin files
here and gc judges them here, so neither has to import the other.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path


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
    """``<pid>.<start time in ms>.<rand>.json``: a pid reused by a later process does not match."""
    start = proc_start(os.getpid()) or 0.0
    return f"{os.getpid()}.{int(start * 1000)}.{uuid.uuid4().hex[:8]}.json"


def pin_alive(p: Path) -> bool:
    try:
        pid, start_ms = (int(x) for x in p.name.split(".")[:2])
    except ValueError:
        return False
    start = proc_start(pid)
    return start is not None and (start < 0 or abs(start * 1000 - start_ms) < 1000)


def tmp_alive(tmp: Path) -> bool:
    """Is the builder that owns this temp folder still running? A killed builder can linger as
    a zombie (no reaper in a container) and its pid can be reused later: neither counts."""
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
