"""Open a device package (a ``package.tar`` or its extracted folder) and verify it.

Layout: ``stages.lib.packaging.layout`` (FORMAT_VERSION 1, the package stage's own constants, so
writer and reader share one definition): one folder ``<name>-<target>/`` with ``manifest.json``
(every other file with its sha256 and size), ``runtime.json`` (io specs, host specs, generation
config, special tokens), ``engines/``, optionally ``onnx/``, ``tokenizer/`` and ``probe/``.
:func:`verify_files` re-hashes every byte; :mod:`stages.lib.runtime.compat` decides whether this
device can run the engines.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from stages.lib.packaging.layout import (
    ENGINES_DIR,
    FORMAT_VERSION,
    MANIFEST,
    ONNX_DIR,
    RUNTIME,
    TOKENIZER_DIR,
)
from stages.lib.runtime.errors import IncompatibleError, PackageError


@dataclass(frozen=True)
class Target:
    name: str
    sm: str
    builder: str  # "tensorrt-rtx" | "tensorrt"
    builder_version: str


@dataclass(frozen=True)
class Compat:
    """How the engines were built (``BuildOptions``): what they may run on besides the exact target."""

    hardware_compatible: bool = False
    version_compatible: bool = False
    weight_stripped: bool = False


@dataclass(frozen=True)
class FileEntry:
    sha256: str
    bytes: int


@dataclass(frozen=True)
class Manifest:
    format: int
    name: str
    family: str
    config_digest: str
    target: Target
    compat: Compat
    precision: dict[str, str]
    graphs: tuple[str, ...]
    files: dict[str, FileEntry]
    parity: dict[str, Any] = field(default_factory=dict)  # the build's verify.json (empty: none)
    created_by: str = ""
    onnx_included: bool = False
    notes: tuple[str, ...] = ()

    @staticmethod
    def parse(doc: Any, where: str) -> Manifest:
        def need(d: Any, key: str, kind: type | tuple[type, ...], path: str) -> Any:
            if not isinstance(d, dict) or key not in d:
                raise PackageError(f"{where}: {path}{key} is missing")
            if not isinstance(d[key], kind) or (kind is int and isinstance(d[key], bool)):
                names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
                raise PackageError(f"{where}: {path}{key} must be {names}, got {type(d[key]).__name__}")
            return d[key]

        fmt = need(doc, "format", int, "")
        if fmt != FORMAT_VERSION:
            raise IncompatibleError(f"{where}: package format {fmt}; this runtime reads format {FORMAT_VERSION} "
                                    f"(use a vlmforge runtime of the same format)")
        t = need(doc, "target", dict, "")
        target = Target(*(str(need(t, k, str, "target.")) for k in ("name", "sm", "builder", "builder_version")))
        c = doc.get("compat") or {}
        if not isinstance(c, dict):
            raise PackageError(f"{where}: compat must be an object")
        compat = Compat(**{k: bool(c.get(k, False)) for k in ("hardware_compatible", "version_compatible",
                                                               "weight_stripped")})
        files: dict[str, FileEntry] = {}
        for rel, e in need(doc, "files", dict, "").items():
            sha, size = need(e, "sha256", str, f"files[{rel!r}]."), need(e, "bytes", int, f"files[{rel!r}].")
            files[safe_relpath(rel, where)] = FileEntry(sha.lower(), size)
        graphs = need(doc, "graphs", list, "")

        def obj(key: str) -> dict[str, Any]:
            v = doc.get(key)
            return v if isinstance(v, dict) else {}

        return Manifest(fmt, str(need(doc, "name", str, "")), str(need(doc, "family", str, "")),
                        str(doc.get("config_digest", "")), target, compat,
                        {str(k): str(v) for k, v in obj("precision").items()}, tuple(str(g) for g in graphs),
                        files, obj("parity"), str(doc.get("created_by", "")), bool(obj("onnx").get("included")),
                        tuple(str(n) for n in doc.get("notes") or ()))


def safe_relpath(rel: str, where: str) -> str:
    p = PurePosixPath(rel)
    if not rel or p.is_absolute() or ".." in p.parts or "\\" in rel or rel == MANIFEST:
        raise PackageError(f"{where}: file entry {rel!r} is not a relative path inside the package")
    return p.as_posix()


@dataclass
class Package:
    root: Path
    manifest: Manifest
    _runtime: dict[str, Any] | None = None

    @property
    def runtime(self) -> dict[str, Any]:
        """runtime.json, read on first use: after :func:`verify_files`, so that a damaged file is
        reported as a digest mismatch naming it, not as whatever its parser makes of it."""
        if self._runtime is None:
            doc = _read_json(self.root / RUNTIME, self.name) if RUNTIME in self.manifest.files else {}
            if not isinstance(doc, dict):
                raise PackageError(f"{self.name}: {RUNTIME} must be a JSON object")
            self._runtime = doc
        return self._runtime

    @property
    def name(self) -> str:
        return f"{self.manifest.name}-{self.manifest.target.name}"

    @property
    def onnx_dir(self) -> Path:
        return self.root / ONNX_DIR

    @property
    def engines_dir(self) -> Path:
        return self.root / ENGINES_DIR

    @property
    def tokenizer_dir(self) -> Path:
        return self.root / TOKENIZER_DIR

    def engine(self, graph: str) -> Path:
        return self.engines_dir / f"{graph}.engine"

    def onnx(self, graph: str) -> Path:
        return self.onnx_dir / f"{graph}.onnx"

    def has_onnx(self) -> bool:
        return all(self.onnx(g).is_file() for g in self.manifest.graphs)

    def io_spec(self, graph: str) -> dict[str, Any]:
        return dict((self.runtime.get("graphs") or {}).get(graph) or {})

    def text_spec(self) -> Any:
        from stages.lib.hostside.text import TextSpec

        d = self.runtime.get("text")
        if not isinstance(d, dict):
            raise PackageError(f"{self.name}: runtime.json has no text spec (a vision-only package cannot generate)")
        return TextSpec(**d)

    def vision_spec(self) -> Any:
        from stages.lib.hostside.vision import VisionSpec

        d = self.runtime.get("vision")
        return VisionSpec.from_dict(d) if isinstance(d, dict) else None

    def describe(self) -> str:
        m, t = self.manifest, self.manifest.target
        prec = ", ".join(f"{g} {p}" for g, p in m.precision.items())
        return f"{self.name} ({m.family}; {t.builder} {t.builder_version} for SM {t.sm}; {prec})"


def _read_json(path: Path, where: str) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise PackageError(f"{where}: {path.name} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PackageError(f"{where}: {path.name} is not valid JSON ({e})") from None


def find_root(path: Path) -> Path:
    """The package folder: ``path`` itself, or its single child that holds a manifest."""
    if (path / MANIFEST).is_file():
        return path
    kids = [p for p in path.iterdir() if (p / MANIFEST).is_file()] if path.is_dir() else []
    if len(kids) == 1:
        return kids[0]
    raise PackageError(f"{path}: not a package (no {MANIFEST}; expected package.tar or its <name>-<target>/ folder)")


def load(root: Path) -> Package:
    """Parse an extracted package folder's manifest; no digests checked yet."""
    root = find_root(Path(root))
    return Package(root, Manifest.parse(_read_json(root / MANIFEST, str(root)), f"{root.name}/{MANIFEST}"))


@contextlib.contextmanager
def opened(path: str | Path) -> Iterator[Package]:
    """The package at ``path`` (a folder, or a tar extracted into a temporary folder removed on exit)."""
    from stages.lib.runtime.archive import extract

    path = Path(path)
    if path.is_dir():
        yield load(path)
        return
    if not path.is_file():
        raise PackageError(f"{path}: no such package (expected package.tar or its extracted folder)")
    tmp = Path(tempfile.mkdtemp(prefix="vlmforge-pkg-"))
    try:
        yield load(extract(path, tmp))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@dataclass
class FileCheck:
    """What :func:`verify_files` found: problems are one line each, naming the file."""

    checked: int = 0
    bytes: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "checked": self.checked, "bytes": self.bytes, "problems": list(self.problems)}


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def verify_files(pkg: Package, digests: bool = True) -> FileCheck:
    """Every listed file present, a regular file, of its size and sha256; nothing unlisted."""
    res = FileCheck()
    for rel, want in sorted(pkg.manifest.files.items()):
        p = pkg.root / rel
        if p.is_symlink() or (p.exists() and not p.is_file()):
            res.problems.append(f"{rel}: not a regular file")
            continue
        if not p.is_file():
            res.problems.append(f"{rel}: missing (the manifest lists it)")
            continue
        size = p.stat().st_size
        if size != want.bytes:
            res.problems.append(f"{rel}: {size} bytes, the manifest says {want.bytes}")
            continue
        if digests and sha256_file(p) != want.sha256:
            res.problems.append(f"{rel}: sha256 differs from the manifest (the file was changed or damaged)")
            continue
        res.checked += 1
        res.bytes += size
    for dirpath, dirnames, filenames in os.walk(pkg.root):
        for n in sorted((*dirnames, *filenames)):
            p = Path(dirpath) / n
            rel = p.relative_to(pkg.root).as_posix()
            if p.is_symlink():
                res.problems.append(f"{rel}: a symlink (a package holds only plain files)")
            elif p.is_file() and rel != MANIFEST and rel not in pkg.manifest.files:
                res.problems.append(f"{rel}: not listed in the manifest")
    return res
