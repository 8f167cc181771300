"""Graph files that share their weights with the graph they were rewritten from.

A rewrite that changes a graph's structure but not its weights (fuse: attention patterns,
cleanup; every decoder weight stays as exported) would otherwise write a second copy of every
weight: 16 GB more disk per stage for an 8 B decoder, on a build machine whose disk then runs out
before the engines are built. Here the rewritten graph keeps pointing at the same bytes: its
external tensors are given a hard link of the source's data file, in the output's own folder
(onnxruntime and TensorRT's parser refuse data outside the model's folder), at the same offsets.
A hard link is another name for the same protected cache file, so neither entry can change it,
and either can be deleted without touching the other. Across file systems it is a copy.

onnx-ir's writers always rewrite the tensors they externalize (``ir.save`` copies, and
``unload_from_model`` re-lays the file), so this small proto-level step is written here. And
``ir.load`` refuses a data file with more than one link (its guard against a link planted in a
user's folder), so graphs this tool wrote and may have shared are opened with
:func:`load_in_file`; a user's own ONNX still goes through ``ir.load`` and its checks.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import onnx_ir as ir

__all__ = ["link_or_copy", "load_in_file", "save_sharing"]

INLINE_MOST = 256 * 1024**2  # new tensors a shared save still carries inline (else: a full save)


def link_or_copy(src: Path, dst: Path) -> str:
    """``dst`` as a hard link of ``src`` where the file system allows, else a copy: "link"/"copy"."""
    if dst.exists() and os.path.samefile(src, dst):
        return "link"
    dst.unlink(missing_ok=True)
    try:
        os.link(src, dst)
        return "link"
    except OSError:  # another file system, or links not allowed here
        shutil.copyfile(src, dst)
        return "copy"


def load_in_file(path: Path) -> ir.Model:
    """A graph this tool wrote, its external tensors left in their file (absolute locations,
    read when asked): ``ir.load`` without the one-link check, for data files fuse shares."""
    import onnx
    import onnx_ir as ir

    from stages.lib.qdq.model_tensors import proto_tensors

    proto = onnx.load(str(path), load_external_data=False)
    base = Path(path).absolute().parent
    for t in proto_tensors(proto):
        for e in t.external_data if t.data_location == onnx.TensorProto.EXTERNAL else ():
            if e.key == "location":
                full = (base / e.value).resolve()  # an absolute value stays itself
                if not full.is_relative_to(base.resolve()):
                    raise ValueError(f"{path}: external data {e.value!r} lies outside the graph's folder")
                e.value = str(full)
    return ir.from_proto(proto)


def save_sharing(model: ir.Model, path: Path, source: Path) -> str | None:
    """Save ``model`` (loaded from the graph file ``source``) to ``path`` with every external
    tensor still pointing at ``source``'s one data file, that file linked in as ``<path>.data``.

    Tensors the rewrite made (folded constants, scales) are written inline. Returns "link" or
    "copy" (how the data file got there), or None, writing nothing, when the model cannot share:
    no external tensors, tensors in more than one file, or over ``INLINE_MOST`` bytes of new ones;
    the caller then saves it whole."""
    import onnx
    import onnx_ir as ir

    from stages.lib.qdq.model_tensors import proto_tensor_bytes, proto_tensors

    proto = ir.to_proto(model)
    external = [t for t in proto_tensors(proto) if t.data_location == onnx.TensorProto.EXTERNAL]
    inline = sum(proto_tensor_bytes(t) for t in proto_tensors(proto) if t.data_location != onnx.TensorProto.EXTERNAL)
    if not external or inline > INLINE_MOST:
        return None
    files: set[Path] = set()
    for t in external:
        loc = Path(next(e.value for e in t.external_data if e.key == "location"))
        files.add((loc if loc.is_absolute() else source.parent / loc).resolve())
    if len(files) != 1 or not (data := files.pop()).is_file():
        return None
    name = path.name + ".data"
    for t in external:
        for e in t.external_data:
            if e.key == "location":
                e.value = name
    how = link_or_copy(data, path.parent / name)
    onnx.save(proto, str(path))
    return how
