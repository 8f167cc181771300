"""gc and fsck over the cache: drop what nothing references, re-hash what is kept.

gc keeps every entry a lock file references and every entry a running build has pinned (its
pin file names it; a pin file of a dead process counts for nothing). It decides under the
exclusive gc lock, which builds hold shared while they pin a key and look it up, so an entry a
build has just found or committed is never collected under it. It deletes only entry folders
(named like a key), temp folders of dead builders and quarantined entries: what vlmforge made.

evict removes an entry's outputs and keeps its manifest (``pipeline.cache``), under the same
locks: never an entry a running build has pinned, never while a worker reads it.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pipeline.cache import EVICTED, CacheStore
from pipeline.liveness import pin_alive, tmp_alive


def live_pins(store: CacheStore, drop_dead: bool) -> set[str]:
    keys: set[str] = set()
    pins = store.root / ".pins"
    for p in sorted(pins.glob("*.json")) if pins.is_dir() else []:
        if not pin_alive(p):
            if drop_dead:
                p.unlink(missing_ok=True)
            continue
        try:
            data = json.loads(p.read_text())
        except (OSError, ValueError):
            data = []
        keys |= {k for k in data if isinstance(k, str)} if isinstance(data, list) else set()
    return keys


def _size(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file() and not f.is_symlink())


@dataclass(frozen=True)
class GcResult:
    removed: list[str]
    stale: list[str]
    freed_bytes: int
    kept: int
    pinned: list[str] = field(default_factory=list)  # kept only because a running build uses them

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def gc(store: CacheStore, keep: set[str], dry_run: bool = False) -> GcResult:
    """Remove entries not in ``keep`` nor pinned by a live build, stale temp folders of dead
    builders and quarantined entries."""
    removed, stale, freed, doomed = [], [], 0, []
    with store.gc_lock(exclusive=True):
        pinned = live_pins(store, drop_dead=not dry_run)
        for key in store.keys():
            if key in keep or key in pinned:
                continue
            freed += _size(store.entry(key))
            removed.append(key)
            if not dry_run:  # renamed away under the lock, deleted after it
                trash = store.root / ".tmp" / f"gc-{key}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
                trash.parent.mkdir(parents=True, exist_ok=True)
                os.rename(store.entry(key), trash)
                doomed.append(trash)
        for sub in (".tmp", ".corrupt"):
            folder = store.root / sub
            for p in sorted(folder.glob("*")) if folder.is_dir() else []:
                if p in doomed or (sub == ".tmp" and tmp_alive(p)):
                    continue
                stale.append(p.name)
                freed += _size(p)
                if not dry_run:
                    doomed.append(p)
    for p in doomed:
        shutil.rmtree(p, ignore_errors=True)
    return GcResult(removed, stale, freed, len(keep), sorted(pinned & set(store.keys()) - keep))


@dataclass(frozen=True)
class EvictResult:
    evicted: list[str]
    freed_bytes: int
    refused: dict[str, str] = field(default_factory=dict)  # key -> why it was left as it was

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def evict(store: CacheStore, keys: list[str]) -> EvictResult:
    """Remove these entries' outputs, keeping their manifests: dependants stay keyed and cached,
    and a build that needs the outputs again rebuilds them."""
    import time

    done, freed, refused = [], 0, {}
    with store.gc_lock(exclusive=True):
        pinned = live_pins(store, drop_dead=False)
        for key in keys:
            found = store.lookup(key, verify=False)
            if found.manifest is None:
                refused[key] = found.reason
                continue
            if found.evicted:
                refused[key] = "already evicted"
                continue
            if key in pinned:
                refused[key] = "in use by a running build"
                continue
            with store.rw_lock(key, exclusive=True):  # no worker reads it now
                out = store.out_dir(key)
                size = _size(out)
                part = store.entry(key) / (EVICTED + ".part")  # the marker first: a crash mid-delete
                part.write_text(json.dumps({"at": time.time(), "bytes": size}))  # leaves it evicted
                os.replace(part, store.entry(key) / EVICTED)
                trash = store.root / ".tmp" / f"evict-{key}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
                trash.parent.mkdir(parents=True, exist_ok=True)
                os.rename(out, trash)
            shutil.rmtree(trash, ignore_errors=True)
            done.append(key)
            freed += size
    return EvictResult(done, freed, refused)


@dataclass(frozen=True)
class FsckResult:
    checked: int
    bytes_read: int
    damaged: dict[str, str]  # key -> what was wrong (each now in .corrupt/)

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def fsck(store: CacheStore, progress: object = None) -> FsckResult:
    """Re-read every byte of every entry (no stat memo), quarantine the damaged ones. Folders
    not named like a key are not ours: neither checked nor touched."""
    damaged: dict[str, str] = {}
    keys = store.keys()
    before = store.memo.hashed_bytes
    for i, key in enumerate(keys):
        if callable(progress):
            progress(i, len(keys), key)
        found = store.lookup(key, rehash=True)
        if not found.hit and not found.evicted:
            damaged[key] = found.reason.removeprefix("cache entry was damaged (").removesuffix("); rebuilding")
    store.memo.save()
    return FsckResult(len(keys), store.memo.hashed_bytes - before, damaged)
