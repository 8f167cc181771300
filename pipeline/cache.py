"""Content-addressed cache: `<root>/<key>/out/...` plus `<root>/<key>/manifest.json`.

Commit protocol: a stage writes into `<root>/.tmp/<key>.<pid>.<rand>/out`; its files are made
read-only, hashed, the manifest (every output's sha256 and size) is written last, then the folder
is renamed to `<root>/<key>` in one `rename(2)`. A SIGKILL at any point leaves only a `.tmp`
folder, which nothing trusts. An entry is used only if its manifest has the expected shape and
every output matches its recorded size and digest; a damaged entry is moved to `.corrupt/` (kept
for inspection, never used) and rebuilt.

Correct without locks (a build farm shares this folder over NFS, where POSIX locks are not to be
relied on): an entry is named by its content's key, is whole before it gets its name, and its
manifest is written last; a second writer of the same key finds the name taken, checks the
entry there and discards its own copy. Temp folders and pin files carry the host's name
(``pipeline.liveness``), so gc on one host never judges another host's by pid.

Locks (all die with their process) only save duplicate work and guard local swaps: builders of
one key serialise on `.locks/<key>.lock`;
a worker reading an entry holds `.locks/<key>.rw` shared, and a `--force` rebuild swaps the entry
only under it exclusively, so an entry never vanishes under a reader; `.locks/gc.lock` is held
shared while a build pins a key and looks it up, exclusively while gc decides what to delete.

Evicted entries (``vlmforge cache evict``: disk, at 8 B an export is 15 GB that fuse holds again)
keep their manifest and lose ``out/``; ``evicted.json`` is written before anything is deleted, so
a half-evicted entry is never used. Its recorded digests still key what was built from it, so a
dependant that is cached stays cached; a build rebuilds an evicted entry only when something it
runs reads it (``pipeline.runner``), and the rebuild replaces it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import time
import uuid
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from pipeline.hashing import SHA256_HEX, HashMemo, hash_tree
from pipeline.liveness import pin_file_name, tmp_name
from pipeline.locks import flocked, shared_many

MANIFEST = "manifest.json"
EVICTED = "evicted.json"  # beside the manifest: out/ was removed on purpose
KEY_RE = re.compile(r"^[0-9a-f]{32}$")  # what cache_key() makes: only such folders are entries


@dataclass(frozen=True)
class Lookup:
    manifest: dict[str, Any] | None
    reason: str  # why not usable, when manifest is None or the entry is evicted
    evicted: bool = False  # manifest known (it keys dependants), outputs removed

    @property
    def hit(self) -> bool:
        return self.manifest is not None and not self.evicted


class CacheError(Exception):
    """A stage's output cannot be committed as it is (e.g. it wrote a symlink)."""


def manifest_problem(key: str, manifest: Any) -> str | None:
    """Why a parsed manifest cannot be trusted (wrong shape, other key, unsafe paths), or None."""
    if not isinstance(manifest, dict):
        return "manifest is not a JSON object"
    if manifest.get("key") != key:
        return "manifest belongs to another key"
    outputs = manifest.get("outputs")
    if not isinstance(outputs, dict):
        return "manifest has no outputs table"
    for rel, meta in outputs.items():
        pure = PurePosixPath(rel) if isinstance(rel, str) else None
        if pure is None or pure.is_absolute() or ".." in pure.parts or not pure.parts:
            return f"manifest names an unsafe output path {rel!r}"
        if not (isinstance(meta, dict) and isinstance(meta.get("bytes"), int)
                and isinstance(meta.get("sha256"), str) and SHA256_HEX.match(meta["sha256"])):
            return f"manifest entry for {rel} lacks a sha256 and a byte count"
    return None


def read_only(path: Path) -> None:
    """Clear the write bits (DVC protects its cache the same way): an editor, a script or a
    `>` redirect into a published file fails instead of silently changing the cache."""
    mode = path.stat().st_mode
    path.chmod(stat.S_IMODE(mode) & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


class CacheStore:
    def __init__(self, root: Path):
        self.root = root
        self.memo = HashMemo(root / ".hashmemo.json")
        self._pin_file: Path | None = None
        self._pinned: set[str] = set()

    # -- paths ---------------------------------------------------------------------------
    def entry(self, key: str) -> Path:
        return self.root / key

    def out_dir(self, key: str) -> Path:
        return self.root / key / "out"

    def lock_path(self, key: str) -> Path:
        return self.root / ".locks" / f"{key}.lock"

    def _rw_path(self, key: str) -> Path:
        return self.root / ".locks" / f"{key}.rw"

    def rw_lock(self, key: str, exclusive: bool) -> AbstractContextManager[bool]:
        """Readers of an entry hold it shared; whoever swaps or empties the entry, exclusively."""
        return flocked(self._rw_path(key), exclusive)

    def gc_lock(self, exclusive: bool) -> AbstractContextManager[bool]:
        return flocked(self.root / ".locks" / "gc.lock", exclusive)

    # -- reading -------------------------------------------------------------------------
    def lookup(self, key: str, verify: bool = True, rehash: bool = False) -> Lookup:
        entry = self.entry(key)
        if not entry.exists():
            return Lookup(None, "not built")
        try:
            manifest = json.loads((entry / MANIFEST).read_text())
        except (OSError, ValueError) as e:
            return self._quarantine(key, f"unreadable manifest ({e.__class__.__name__})")
        bad = manifest_problem(key, manifest)
        if bad is None and (entry / EVICTED).exists():
            return Lookup(manifest, "evicted (vlmforge cache evict): its outputs were removed; rebuilt when a "
                                    "node that runs reads them", evicted=True)
        if bad is None and verify:
            bad = self._verify(key, manifest, rehash)
        if bad:
            return self._quarantine(key, bad)
        return Lookup(manifest, "")

    def _verify(self, key: str, manifest: dict[str, Any], rehash: bool) -> str | None:
        out = self.out_dir(key)
        recorded: dict[str, dict[str, Any]] = manifest["outputs"]
        for rel, meta in recorded.items():
            p = out / rel
            if p.is_symlink() or not p.is_file():
                return f"output {rel} is missing"
            if p.stat().st_size != meta["bytes"]:
                return f"output {rel} has {p.stat().st_size} bytes, manifest says {meta['bytes']}"
            sha = self.memo.rehash(p) if rehash else self.memo.sha256(p)
            if sha != meta["sha256"]:
                return f"output {rel} does not match its recorded sha256"
        extra = {p.relative_to(out).as_posix() for p in out.rglob("*") if not p.is_dir()} - set(recorded)
        if extra:
            return f"unrecorded files in entry: {sorted(extra)[:3]}"
        return None

    def _quarantine(self, key: str, reason: str) -> Lookup:
        """Move a damaged entry aside (kept for inspection, never used) and report why."""
        dest = self.root / ".corrupt" / f"{key}.{int(time.time())}.{uuid.uuid4().hex[:6]}"
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(self.entry(key), dest)
        except FileNotFoundError:
            return Lookup(None, "not built")
        return Lookup(None, f"cache entry was damaged ({reason}); rebuilding")

    @contextmanager
    def reading(self, keys: list[str]) -> Iterator[None]:
        """Hold these entries for reading: a --force rebuild of one waits until we are done."""
        with shared_many([self._rw_path(k) for k in keys]):
            yield

    # -- pins: what a running build uses, which gc must keep ----------------------------------
    def pin(self, key: str) -> None:
        """Record that this build process uses ``key`` (call under ``gc_lock(False)``)."""
        if self._pin_file is None or key in self._pinned:
            return
        self._pinned.add(key)
        part = self._pin_file.with_suffix(".part")
        part.write_text(json.dumps(sorted(self._pinned)))
        os.replace(part, self._pin_file)

    @contextmanager
    def pinning(self) -> Iterator[None]:
        """For the duration of a build, keys passed to ``pin`` are kept by a concurrent gc."""
        self._pin_file = self.root / ".pins" / pin_file_name()
        self._pin_file.parent.mkdir(parents=True, exist_ok=True)
        try:
            yield
        finally:
            self._pin_file.unlink(missing_ok=True)
            self._pin_file, self._pinned = None, set()

    # -- writing -------------------------------------------------------------------------
    def begin(self, key: str) -> Path:
        tmp = self.root / ".tmp" / tmp_name(key)
        (tmp / "out").mkdir(parents=True)
        return tmp

    def commit(self, key: str, tmp: Path, manifest: dict[str, Any], replace: bool = False) -> dict[str, Any]:
        """Protect and hash outputs, write the manifest last, rename into place.

        ``replace`` (a --force rebuild): an existing entry is swapped out under the key's
        exclusive read lock, so no reader ever sees it half there. Returns the manifest."""
        out = tmp / "out"
        replace = replace or (self.entry(key) / EVICTED).exists()  # a rebuild of an evicted entry
        links = [p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_symlink()]
        if links:  # a link could point anywhere (outside the cache, at a user's file)
            raise CacheError(f"stage output {links[0]} is a symlink; stages must write real files")
        for p in out.rglob("*"):
            if p.is_file():
                read_only(p)
        manifest = {**manifest, "key": key, "outputs": hash_tree(out, self.memo)}
        mtmp = tmp / (MANIFEST + ".part")
        with open(mtmp, "w") as f:
            json.dump(manifest, f, indent=2, sort_keys=True, default=str)
            f.flush()
            os.fsync(f.fileno())
        read_only(mtmp)
        os.replace(mtmp, tmp / MANIFEST)
        if replace:
            with flocked(self._rw_path(key), exclusive=True):
                trash = self.root / ".tmp" / f"replaced-{key}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
                try:
                    os.rename(self.entry(key), trash)
                except FileNotFoundError:
                    trash = None  # type: ignore[assignment]
                os.rename(tmp, self.entry(key))
            if trash is not None:
                shutil.rmtree(trash, ignore_errors=True)
        else:
            try:
                os.rename(tmp, self.entry(key))
            except OSError:
                # Another builder committed the same key first (we hold the key lock, so only one
                # that bypassed it, or a damaged leftover). Trust a valid one.
                found = self.lookup(key)
                if found.hit:
                    shutil.rmtree(tmp, ignore_errors=True)
                    assert found.manifest is not None
                    return found.manifest
                os.rename(tmp, self.entry(key))
        for rel in manifest["outputs"]:  # keep the memo warm under the entry's final path
            self.memo.carry(out / rel, self.out_dir(key) / rel)
        self.memo.save()
        return manifest

    def abort(self, tmp: Path) -> None:
        shutil.rmtree(tmp, ignore_errors=True)

    # -- housekeeping ----------------------------------------------------------------------
    def keys(self) -> list[str]:
        """Entry folders (named like a key); anything else under the root is not ours to judge."""
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and KEY_RE.match(p.name))
