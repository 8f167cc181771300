"""Deterministic tar writing and the checks a reader applies (stdlib only).

A package is a list of ``Member``s (a path inside the top folder and either a source file or
bytes). ``write_tar`` streams them into an uncompressed tar in sorted order with fixed
metadata (see ``layout``), so the same members give the same bytes; ``check_archive`` is the
reader's side: one top folder, no links, no absolute or ``..`` paths, normalised metadata and
every file matching the manifest's sha256 and size.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any, BinaryIO

from stages.lib.packaging import layout

CHUNK = 1 << 20


@dataclass(frozen=True)
class Member:
    """One file of the package: ``path`` relative to the top folder, content from ``source``
    (streamed, never read whole) or ``data``."""

    path: str
    source: Path | None = None
    data: bytes | None = None

    def __post_init__(self) -> None:
        if (self.source is None) == (self.data is None):
            raise ValueError(f"{self.path}: a member has exactly one of source and data")
        check_path(self.path)

    @property
    def size(self) -> int:
        return len(self.data) if self.data is not None else Path(str(self.source)).stat().st_size

    def open(self) -> BinaryIO:
        return io.BytesIO(self.data) if self.data is not None else Path(str(self.source)).open("rb")


def check_path(path: str) -> None:
    """A member path: relative, POSIX, no ``.``/``..``/empty parts."""
    p = PurePosixPath(path)
    if not path or p.is_absolute() or "\\" in path or any(part in ("", ".", "..") for part in path.split("/")):
        raise ValueError(f"package member path {path!r} must be relative, without '.', '..' or empty parts")


def file_digest(member: Member) -> dict[str, Any]:
    """{"sha256", "bytes"} of a member's content (one streaming pass)."""
    h, n = hashlib.sha256(), 0
    with member.open() as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            n += len(chunk)
    return {"sha256": h.hexdigest(), "bytes": n}


class _HashingWriter:
    """A write-only file that hashes what passes through (tar streaming mode needs only write)."""

    def __init__(self, f: IO[bytes]):
        self.f, self.h, self.n = f, hashlib.sha256(), 0

    def write(self, b: bytes) -> int:
        self.h.update(b)
        self.n += len(b)
        return self.f.write(b)


def _info(name: str, *, size: int = 0, is_dir: bool = False) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type = tarfile.DIRTYPE if is_dir else tarfile.REGTYPE
    ti.mode = layout.DIR_MODE if is_dir else layout.FILE_MODE
    ti.size = 0 if is_dir else size
    ti.mtime, ti.uid, ti.gid, ti.uname, ti.gname = 0, 0, 0, "", ""
    return ti


def _dirs(top: str, paths: Iterable[str]) -> set[str]:
    out = {top}
    for p in paths:
        parts = p.split("/")[:-1]
        out |= {"/".join([top, *parts[:i + 1]]) for i in range(len(parts))}
    return out


def write_tar(dest: Path, top: str, members: list[Member]) -> dict[str, Any]:
    """Write ``members`` under the folder ``top`` into the tar ``dest``; {"sha256", "bytes"} of it."""
    check_path(top)
    if "/" in top:
        raise ValueError(f"top folder {top!r} must be one path component")
    seen = [m.path for m in members]
    if len(set(seen)) != len(seen):
        raise ValueError(f"duplicate package members: {sorted({p for p in seen if seen.count(p) > 1})}")
    entries: list[tuple[str, Member | None]] = [(d, None) for d in _dirs(top, seen)]
    entries += [(f"{top}/{m.path}", m) for m in members]
    clash = {name for name, m in entries if m is not None} & {name for name, m in entries if m is None}
    if clash:
        raise ValueError(f"package paths used both as a file and a folder: {sorted(clash)}")
    with dest.open("wb") as raw:
        w = _HashingWriter(raw)
        with tarfile.open(fileobj=w, mode="w|", format=tarfile.PAX_FORMAT) as tar:  # type: ignore[call-overload]
            for name, m in sorted(entries, key=lambda e: e[0]):
                if m is None:
                    tar.addfile(_info(name, is_dir=True))
                    continue
                size = m.size
                with m.open() as f:
                    tar.addfile(_info(name, size=size), f)
    return {"sha256": w.h.hexdigest(), "bytes": w.n}


def check_archive(tar_path: str | Path) -> list[str]:
    """Problems with a package tar (empty when it is well formed and matches its manifest)."""
    problems: list[str] = []
    files: dict[str, dict[str, Any]] = {}
    manifest: dict[str, Any] | None = None
    tops, names = set(), []
    with tarfile.open(tar_path, mode="r:") as tar:
        for ti in tar:
            names.append(ti.name)
            tops.add(ti.name.split("/", 1)[0])
            try:
                check_path(ti.name)
            except ValueError as e:
                problems.append(str(e))
            if not (ti.isfile() or ti.isdir()):
                problems.append(f"{ti.name}: not a plain file or folder (links are not allowed)")
                continue
            mode = layout.DIR_MODE if ti.isdir() else layout.FILE_MODE
            if (ti.mode, ti.mtime, ti.uid, ti.gid, ti.uname, ti.gname) != (mode, 0, 0, 0, "", ""):
                problems.append(f"{ti.name}: metadata not normalised (mode {ti.mode:o}, mtime {ti.mtime}, "
                                f"uid {ti.uid}, gid {ti.gid})")
            if ti.isfile():
                f = tar.extractfile(ti)
                assert f is not None
                data = f.read() if ti.name.endswith("/" + layout.MANIFEST) and ti.name.count("/") == 1 else None
                if data is not None:
                    manifest = json.loads(data)
                    continue
                h = hashlib.sha256()
                while chunk := f.read(CHUNK):
                    h.update(chunk)
                files[ti.name.split("/", 1)[1]] = {"sha256": h.hexdigest(), "bytes": ti.size}
    if len(tops) != 1:
        problems.append(f"expected one top folder, found {sorted(tops)}")
    if names != sorted(names):
        problems.append("members are not sorted by path")
    if manifest is None:
        return [*problems, f"no top-level {layout.MANIFEST}"]
    if manifest.get("format") != layout.FORMAT_VERSION:
        problems.append(f"manifest format {manifest.get('format')!r}, expected {layout.FORMAT_VERSION}")
    listed = manifest.get("files") or {}
    for rel in sorted(set(listed) | set(files)):
        if rel not in files:
            problems.append(f"{rel}: in the manifest, not in the tar")
        elif rel not in listed:
            problems.append(f"{rel}: in the tar, not in the manifest")
        elif listed[rel] != files[rel]:
            problems.append(f"{rel}: sha256/bytes differ from the manifest")
    return problems


def read_member(tar_path: str | Path, rel: str) -> bytes:
    """One file's bytes, by its path inside the top folder."""
    with tarfile.open(tar_path, mode="r:") as tar:
        for ti in tar:
            if ti.isfile() and ti.name.split("/", 1)[-1] == rel and "/" in ti.name:
                f = tar.extractfile(ti)
                assert f is not None
                return f.read()
    raise KeyError(f"{tar_path}: no member {rel}")
