"""The shared TensorRT timing cache: one file per (target, builder, builder version).

A timing cache records which tactic won for a layer configuration, so a rebuild skips the
measuring. It does not change what an engine computes, so it stays out of the node's cache key
and out of its output folder: it lives in `VLMFORGE_TIMING_CACHE_DIR` (default
`<repo>/artifacts/timing-caches`), shared by concurrent builds under a file lock. A cache from
another builder version is rejected by TensorRT, hence the version in the file name.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]


def default_dir() -> Path:
    env = os.environ.get("VLMFORGE_TIMING_CACHE_DIR")
    return Path(env).expanduser().resolve() if env else REPO / "artifacts" / "timing-caches"


def cache_path(folder: Path, target: str, sm: str, builder: str, version: str) -> Path:
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{target}-sm{sm}-{builder}-{version}")
    return folder / f"{safe}.cache"


@dataclass
class TimingCacheUse:
    path: Path
    loaded_bytes: int = 0  # 0: started cold
    saved_bytes: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "warm": self.loaded_bytes > 0, "loaded_bytes": self.loaded_bytes,
                "saved_bytes": self.saved_bytes}


def _lock(path: Path) -> Any:
    from filelock import FileLock

    return FileLock(str(path) + ".lock", timeout=600)


def attach(config: Any, path: Path) -> tuple[Any, TimingCacheUse]:
    """Load the cache file (if any) into a new ITimingCache and set it on the builder config."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with _lock(path):
        data = path.read_bytes() if path.is_file() else b""
    cache = config.create_timing_cache(data)
    if cache is None and data:  # a corrupt or foreign file: start cold rather than fail the build
        data = b""
        cache = config.create_timing_cache(b"")
    if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
        raise RuntimeError(f"TensorRT rejected the timing cache {path}")
    return cache, TimingCacheUse(path, loaded_bytes=len(data))


def save(config: Any, cache: Any, use: TimingCacheUse) -> None:
    """Merge what this build measured into the file another build may have updated meanwhile."""
    with _lock(use.path):
        if use.path.is_file():
            on_disk = config.create_timing_cache(use.path.read_bytes())
            if on_disk is not None:
                cache.combine(on_disk, True)  # ignore_mismatch: entries from another device are skipped
        blob = bytes(memoryview(cache.serialize()))
        tmp = use.path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_bytes(blob)
        os.replace(tmp, use.path)  # readers never see a half-written cache
        use.saved_bytes = len(blob)
