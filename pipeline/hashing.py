"""Content hashing for cache keys: stable JSON, file and folder digests, a stat memo.

The memo (DVC's trick) maps a file's (size, mtime_ns, inode, ctime_ns) to its digest so that an
unchanged multi-GB checkpoint or engine is not re-read on every `plan`. Any write changes mtime
or size, and ctime moves on every write, chmod or rename and cannot be set back by a user (`touch`
can restore mtime, not ctime), so an edited file is always re-hashed. What the stat cannot see
(bit rot under an unchanged inode) is what `vlmforge fsck` re-reads every byte for.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

CHUNK = 1 << 20
SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")


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


def _stamp(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns]


def _valid_row(row: Any) -> bool:
    return (isinstance(row, list) and len(row) == 5 and all(isinstance(x, int) for x in row[:4])
            and isinstance(row[4], str) and bool(SHA256_HEX.match(row[4])))


class HashMemo:
    """Digest cache keyed on a file's stat; lost updates from racing processes are harmless.

    A memo of the wrong shape (hand-edited, from an older version, half-written by a crashed
    tool) is ignored row by row: it only ever costs re-hashing, never a wrong digest.
    """

    def __init__(self, path: Path | None):
        self.path = path
        self._data: dict[str, list[Any]] = {}
        self._dirty = False
        self.hashed_bytes = 0  # bytes actually read by this memo (a rebuild should read ~none)
        if path is not None and path.is_file():
            try:
                raw = json.loads(path.read_text())
            except (OSError, ValueError):
                raw = {}
            if isinstance(raw, dict):
                self._data = {k: v for k, v in raw.items() if isinstance(k, str) and _valid_row(v)}

    def sha256(self, path: Path) -> str:
        st = path.stat()
        stamp = _stamp(st)
        key = str(path.resolve())
        hit = self._data.get(key)
        if hit is not None and hit[:4] == stamp:
            return str(hit[4])
        sha = sha256_file(path)
        self.hashed_bytes += st.st_size
        after = _stamp(path.stat())
        if after == stamp:  # changed while being read: do not remember a digest of moving bytes
            self._data[key] = [*stamp, sha]
            self._dirty = True
        return sha

    def rehash(self, path: Path) -> str:
        """Read every byte again, whatever the stat says (fsck), and remember the result."""
        self.forget(path)
        return self.sha256(path)

    def carry(self, old: Path, new: Path) -> None:
        """A file moved with rename(2) of a parent folder keeps its inode and ctime: move its
        memo row too instead of reading a multi-GB file again under its new name."""
        row = self._data.get(str(old.resolve()))
        if row is None:
            return
        try:
            stamp = _stamp(new.stat())
        except OSError:
            return
        if row[:4] == stamp:
            self._data[str(new.resolve())] = row
            self._dirty = True

    def forget(self, path: Path) -> None:
        if self._data.pop(str(path.resolve()), None) is not None:
            self._dirty = True

    def save(self) -> None:
        if not self._dirty or self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".memo.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(self._data, f)
            os.replace(tmp, self.path)
        except OSError:  # a memo that cannot be saved (disk full) only costs re-hashing later
            Path(tmp).unlink(missing_ok=True)
            return
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
