"""Content-addressed cache: `<root>/<key>/out/...` plus `<root>/<key>/manifest.json`.

Commit protocol: a stage writes into `<root>/.tmp/<key>.<pid>.<rand>/out`, the manifest (with
every output's sha256 and size) is written last inside that folder, then the folder is renamed
to `<root>/<key>` in one `rename(2)`. A SIGKILL at any point leaves only a `.tmp` folder, which
nothing trusts. An entry is used only if its manifest parses and every output matches its
recorded size and digest; a damaged entry is moved to `.corrupt/` and rebuilt. Builders of the
same key in several processes serialise on `<root>/.locks/<key>.lock`.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.hashing import HashMemo, hash_tree

MANIFEST = "manifest.json"


@dataclass(frozen=True)
class Lookup:
    manifest: dict[str, Any] | None
    reason: str  # why not usable, when manifest is None

    @property
    def hit(self) -> bool:
        return self.manifest is not None


class CacheStore:
    def __init__(self, root: Path):
        self.root = root
        self.memo = HashMemo(root / ".hashmemo.json")

    # -- paths ---------------------------------------------------------------------------
    def entry(self, key: str) -> Path:
        return self.root / key

    def out_dir(self, key: str) -> Path:
        return self.root / key / "out"

    def lock_path(self, key: str) -> Path:
        return self.root / ".locks" / f"{key}.lock"

    # -- reading -------------------------------------------------------------------------
    def lookup(self, key: str, verify: bool = True) -> Lookup:
        entry = self.entry(key)
        if not entry.exists():
            return Lookup(None, "not built")
        mpath = entry / MANIFEST
        try:
            manifest = json.loads(mpath.read_text())
            if manifest.get("key") != key:
                raise ValueError("manifest belongs to another key")
        except (OSError, ValueError) as e:
            return self._quarantine(key, f"unreadable manifest ({e.__class__.__name__})")
        if verify:
            bad = self._verify(key, manifest)
            if bad:
                return self._quarantine(key, bad)
        return Lookup(manifest, "")

    def _verify(self, key: str, manifest: dict[str, Any]) -> str | None:
        out = self.out_dir(key)
        recorded: dict[str, dict[str, Any]] = manifest.get("outputs", {})
        for rel, meta in recorded.items():
            p = out / rel
            if not p.is_file():
                return f"output {rel} is missing"
            if p.stat().st_size != meta["bytes"]:
                return f"output {rel} has {p.stat().st_size} bytes, manifest says {meta['bytes']}"
            if self.memo.sha256(p) != meta["sha256"]:
                return f"output {rel} does not match its recorded sha256"
        extra = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()} - set(recorded)
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
        except OSError:
            shutil.rmtree(self.entry(key), ignore_errors=True)
        return Lookup(None, f"cache entry was damaged ({reason}); rebuilding")

    # -- writing -------------------------------------------------------------------------
    def begin(self, key: str) -> Path:
        tmp = self.root / ".tmp" / f"{key}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        (tmp / "out").mkdir(parents=True)
        return tmp

    def commit(self, key: str, tmp: Path, manifest: dict[str, Any]) -> dict[str, Any]:
        """Hash outputs, write the manifest last, rename into place. Returns the manifest."""
        manifest = {**manifest, "key": key, "outputs": hash_tree(tmp / "out", self.memo)}
        mtmp = tmp / (MANIFEST + ".part")
        with open(mtmp, "w") as f:
            json.dump(manifest, f, indent=2, sort_keys=True, default=str)
            f.flush()
            os.fsync(f.fileno())
        os.replace(mtmp, tmp / MANIFEST)
        try:
            os.rename(tmp, self.entry(key))
        except OSError:
            # Another builder committed the same key first (we hold the lock, so only a
            # builder that bypassed it, or a damaged leftover). Trust a valid one.
            found = self.lookup(key)
            if found.hit:
                shutil.rmtree(tmp, ignore_errors=True)
                assert found.manifest is not None
                return found.manifest
            os.rename(tmp, self.entry(key))
        self.memo.save()
        # Rehash under the entry's final path so the memo (keyed on path) stays warm.
        for rel in manifest["outputs"]:
            self.memo.sha256(self.out_dir(key) / rel)
        self.memo.save()
        return manifest

    def evict(self, key: str) -> None:
        """Drop an entry (for --force): renamed away first so no reader sees it half-deleted."""
        if self.entry(key).exists():
            trash = self.root / ".tmp" / f"evicted-{key}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
            trash.parent.mkdir(parents=True, exist_ok=True)
            os.rename(self.entry(key), trash)
            shutil.rmtree(trash, ignore_errors=True)

    def abort(self, tmp: Path) -> None:
        shutil.rmtree(tmp, ignore_errors=True)

    # -- housekeeping ----------------------------------------------------------------------
    def keys(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))

    def gc(self, keep: set[str], dry_run: bool = False) -> dict[str, Any]:
        """Remove entries not in `keep`, stale temp folders of dead builders, quarantined entries."""
        removed, freed = [], 0
        for key in self.keys():
            if key not in keep:
                freed += _size(self.entry(key))
                removed.append(key)
                if not dry_run:
                    shutil.rmtree(self.entry(key), ignore_errors=True)
        stale = []
        for sub in (".tmp", ".corrupt"):
            for p in sorted((self.root / sub).glob("*")) if (self.root / sub).is_dir() else []:
                if sub == ".tmp" and _pid_alive(p):
                    continue
                stale.append(p.name)
                freed += _size(p)
                if not dry_run:
                    shutil.rmtree(p, ignore_errors=True)
        return {"removed": removed, "stale": stale, "freed_bytes": freed, "kept": len(keep)}


def _size(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def _pid_alive(tmp: Path) -> bool:
    """Is the builder that owns this temp folder still running? A killed builder can linger as
    a zombie (no reaper in a container) and its pid can be reused later: neither counts."""
    import psutil

    try:
        pid = int(tmp.name.split(".")[1])
        proc = psutil.Process(pid)
        if proc.status() in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD):
            return False
        return proc.create_time() <= tmp.stat().st_mtime + 1.0  # started after the folder: reused pid
    except (IndexError, ValueError, psutil.NoSuchProcess, FileNotFoundError):
        return False
    except psutil.AccessDenied:
        return True
