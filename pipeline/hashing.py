"""Content hashing for cache keys: stable JSON, file and folder digests, a stat memo.

The memo (DVC's trick) maps (path, size, mtime_ns, inode) to a digest so that an unchanged
multi-GB checkpoint or engine is not re-read on every `plan`: any write changes mtime or size
and forces a re-hash, which is what catches a truncated or edited cache entry.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

CHUNK = 1 << 20


def stable_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()


def digest(obj: Any) -> str:
    return hashlib.sha256(stable_json(obj)).hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


class HashMemo:
    """Digest cache keyed on a file's stat; lost updates from racing processes are harmless."""

    def __init__(self, path: Path | None):
        self.path = path
        self._data: dict[str, list[Any]] = {}
        self._dirty = False
        if path is not None and path.is_file():
            try:
                self._data = json.loads(path.read_text())
            except (OSError, ValueError):
                self._data = {}  # a damaged memo only costs re-hashing

    def sha256(self, path: Path) -> str:
        st = path.stat()
        stamp = [st.st_size, st.st_mtime_ns, st.st_ino]
        key = str(path.resolve())
        hit = self._data.get(key)
        if hit is not None and hit[:3] == stamp:
            return str(hit[3])
        sha = sha256_file(path)
        self._data[key] = [*stamp, sha]
        self._dirty = True
        return sha

    def forget(self, path: Path) -> None:
        if self._data.pop(str(path.resolve()), None) is not None:
            self._dirty = True

    def save(self) -> None:
        if not self._dirty or self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".memo.")
        with os.fdopen(fd, "w") as f:
            json.dump(self._data, f)
        os.replace(tmp, self.path)
        self._dirty = False


def hash_tree(root: Path, memo: HashMemo | None = None) -> dict[str, dict[str, Any]]:
    """{relative path: {sha256, bytes}} for every file under root (a file hashes as itself)."""
    memo = memo or HashMemo(None)
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    out = {}
    for p in files:
        rel = p.name if p == root else p.relative_to(root).as_posix()
        out[rel] = {"sha256": memo.sha256(p), "bytes": p.stat().st_size}
    return out


def toolchain_versions(dists: tuple[str, ...]) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for d in dists:
        try:
            out[d] = version(d)
        except PackageNotFoundError:
            out[d] = "absent"
    return out
