"""Checkpoint tensors bound to ONNX initializers lazily: read one at a time, when saved.

The stamped decoder export (``decoder_stamp``) builds the graph with no real weights in memory;
each initializer gets an ``ir.LazyTensor`` whose function reads its one tensor from the
safetensors shard (a plain seek + read, like ``checkpoints.read_safetensors``: no mmap, whose
pages would count in RSS), converts the dtype and transposes it for the folded ``*_t``
MatMul weights. ``ir.save`` writes them one by one to the external data file (each read once and
written converted in blocks), so the peak is one tensor, whatever the model's size.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.stage import StageError
from stages.lib.checkpoints import safetensors_check as st
from stages.lib.dtypes import torch_dtype, torch_of_safetensors

if TYPE_CHECKING:
    import onnx_ir as ir

__all__ = ["TensorRef", "bind_weights", "check_tensors", "checkpoint_tensors", "export_embed_lazy", "lazy_tensor",
           "missing_tensor", "param_pattern", "read_tensor", "save"]

_LAYER = re.compile(r"layers\.(\d+)\.")
_EMBED = "model.language_model.embed_tokens.weight"


@dataclass(frozen=True)
class TensorRef:
    """Where one checkpoint tensor's bytes are."""

    shard: Path
    name: str  # as stored in the shard (hub or transformers-5 naming)
    dtype: str  # safetensors dtype (``BF16``, ``F32``, ...)
    shape: tuple[int, ...]
    offset: int  # absolute file offset of the first byte
    nbytes: int


def checkpoint_tensors(path: str | Path, prefixes: tuple[str, ...], canonical: Any) -> dict[str, TensorRef]:
    """``canonical(name)`` -> TensorRef of every tensor whose stored name starts with ``prefixes``.

    Headers only (``safetensors_check.read_header``, which validates them): no tensor data.
    """
    from stages.lib.checkpoints.local import weight_files

    refs: dict[str, TensorRef] = {}
    for shard in weight_files(path):
        header = st.read_header(shard)
        for name, info in header.tensors.items():
            if name.startswith(prefixes):
                start, end = info["data_offsets"]
                refs[canonical(name)] = TensorRef(shard, name, info["dtype"], tuple(info["shape"]),
                                                  header.data_start + start, end - start)
    return refs


def missing_tensor(path: str | Path, stored_name: str, why: str) -> StageError:
    """One line naming the file that should hold ``stored_name`` (the index when sharded)."""
    root = Path(path)
    index = root / "model.safetensors.index.json"
    where = index if index.is_file() else next(iter(sorted(root.glob("*.safetensors"))), root)
    return StageError(f"{where}: no tensor {stored_name} ({why})")


def _read_raw(ref: TensorRef) -> Any:
    """The stored tensor (torch, its own dtype) over a buffer of its own: one read, no mmap."""
    import torch

    src = torch_of_safetensors(ref.dtype)
    if ref.nbytes == 0:
        return torch.empty(ref.shape, dtype=src)
    buf = bytearray(ref.nbytes)
    with open(ref.shard, "rb") as f:
        f.seek(ref.offset)
        got = f.readinto(buf)
    if got != ref.nbytes:  # the file changed since its header was checked
        raise st.truncated(ref.shard, ref.offset + ref.nbytes, ref.offset + (got or 0))
    return torch.frombuffer(buf, dtype=src).reshape(ref.shape)


def read_tensor(ref: TensorRef, dtype: Any, transpose: bool = False) -> Any:
    """The tensor (torch) in ``dtype`` (floats only), transposed for a ``*_t`` initializer."""
    import torch

    raw = _read_raw(ref)
    want = dtype if raw.is_floating_point() else raw.dtype
    if transpose:  # convert and transpose in one copy
        return torch.empty(tuple(reversed(ref.shape)), dtype=want).copy_(raw.t())
    return raw if want == raw.dtype else raw.to(want)


# ir.save writes a tensor with ``tofile``: the checkpoint tensor is read once and written
# converted / transposed in blocks of this size, so the big ones (lm_head: vocab x hidden) are
# in memory once, not twice (read buffer + converted copy)
_BLOCK_BYTES = 64 * 1024**2


@functools.cache
def _checkpoint_tensor_class() -> type:
    import onnx_ir as ir
    import torch

    class CheckpointTensor(ir.LazyTensor):
        """An ``ir.LazyTensor`` over one checkpoint tensor whose ``tofile`` streams blocks."""

        __slots__ = ("_ref", "_to", "_transpose")

        def __init__(self, ref: TensorRef, dtype: Any, transpose: bool, name: str) -> None:
            from onnx_ir.tensor_adapters import TorchTensor, from_torch_dtype

            shape = tuple(reversed(ref.shape)) if transpose else ref.shape
            super().__init__(lambda: TorchTensor(read_tensor(ref, dtype, transpose), name=name),
                             dtype=from_torch_dtype(dtype), shape=ir.Shape(shape), name=name)
            self._ref, self._to, self._transpose = ref, dtype, transpose

        def tofile(self, file: Any) -> None:
            raw = _read_raw(self._ref)
            view = raw.t() if self._transpose else raw
            want = self._to if raw.is_floating_point() else raw.dtype
            if view.dim() != 2:
                view = view.reshape(1, -1)
            step = max(1, _BLOCK_BYTES // max(1, view.shape[1] * view.element_size()))
            for i in range(0, view.shape[0], step):
                block = view[i:i + step].to(want).contiguous()
                file.write(block.view(torch.uint8).numpy())

    return CheckpointTensor


def lazy_tensor(ref: TensorRef, dtype: Any, transpose: bool, name: str) -> ir.LazyTensor:
    """A lazy tensor that reads ``ref`` when evaluated or written (each time: no cache)."""
    tensor: ir.LazyTensor = _checkpoint_tensor_class()(ref, dtype, transpose, name)
    return tensor


def save(model: ir.Model, out_path: Path, external: bool) -> None:
    """``ir.save``, to ``<graph>.onnx.data`` when ``external`` (serially: one tensor in flight)."""
    import onnx_ir as ir

    ir.save(model, str(out_path), external_data=out_path.name + ".data" if external else None)


def param_pattern(path: str) -> str:
    """A parameter's graph path with its layer index as ``layers.#.`` (one name for every layer)."""
    return _LAYER.sub("layers.#.", path)


def _decoder_tensors(ckpt: Path) -> dict[str, TensorRef]:
    from stages.lib.export.decoder_load import _PREFIXES, _canonical

    return checkpoint_tensors(ckpt, _PREFIXES, _canonical)


def _stored(refs: dict[str, TensorRef], canonical: str) -> str:
    """The name a checkpoint in the original hub layout (``model.layers.*``) would use."""
    hub = any(r.name.startswith("model.layers.") for r in refs.values())
    return canonical.replace("model.language_model.", "model.", 1) if hub else canonical


def _resolve(ckpt: Path, refs: dict[str, TensorRef], base: str, tied: bool) -> tuple[TensorRef, str]:
    """(the tensor of graph parameter path ``base``, what needs it); StageError when absent."""
    name = "model.language_model." + base[len("text_model."):] if base.startswith("text_model.") else base
    if name == "lm_head.weight" and name not in refs and tied:
        name = _EMBED
    layer = _LAYER.search(name)
    why = f"decoder layer {layer.group(1)}" if layer else "decoder"
    ref = refs.get(name)
    if ref is None:
        raise missing_tensor(ckpt, _stored(refs, name), f"needed by the {why}")
    return ref, why


def check_tensors(ckpt: Path, paths: list[str], tied: bool) -> None:
    """Every parameter path has its checkpoint tensor (headers only): before an export, not during."""
    refs = _decoder_tensors(ckpt)
    for path in paths:
        _resolve(ckpt, refs, path, tied)


def bind_weights(model: ir.Model, params: set[str], ckpt: Path, dtype: str, tied: bool) -> int:
    """Point every parameter initializer at its checkpoint tensor (an ``ir.LazyTensor``); return the
    bound bytes. ``params``: the parameters' ``param_pattern`` (``decoder_stamp.name_initializers``).

    Names: ``text_model.X`` is ``model.language_model.X`` (hub checkpoints: ``model.X``), ``..._t``
    its transpose. The template's lm_head had a smaller vocab: the real one is set on its
    initializer and on the values computed from it (the logits).
    """
    tdtype = torch_dtype(dtype)
    refs = _decoder_tensors(ckpt)
    total = 0
    for value in list(model.graph.initializers.values()):
        path = str(value.name)
        base = path.removesuffix("_t")
        if param_pattern(base) not in params:
            continue  # a constant of the graph (shape, scalar), or a buffer (rotary inv_freq)
        ref, why = _resolve(ckpt, refs, base, tied)
        transpose = path != base
        shape = tuple(reversed(ref.shape)) if transpose else ref.shape
        want = value.shape.numpy() if value.shape is not None else shape  # initializers: static
        vocab_dim = (1 if transpose else 0) if base in ("lm_head.weight", "text_model.embed_tokens.weight") else None
        if len(shape) != len(want) or any(a != b for i, (a, b) in enumerate(zip(shape, want, strict=True))
                                           if i != vocab_dim):
            raise StageError(f"{ref.shard}: tensor {ref.name} has shape {list(ref.shape)}, the {why} needs "
                             f"{list(reversed(want)) if transpose else list(want)}")
        tensor = lazy_tensor(ref, tdtype, transpose, path)
        value.const_value, value.shape = tensor, tensor.shape
        total += tensor.nbytes
        if vocab_dim is not None and shape[vocab_dim] != want[vocab_dim]:
            _set_vocab(value, want[vocab_dim], shape[vocab_dim])
    return total


def _set_vocab(weight: ir.Value, old: int, new: int) -> None:
    import onnx_ir as ir

    stack = [u for u, _ in weight.uses()]
    seen: set[ir.Node] = set()
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        for out in node.outputs:
            if out.shape is not None and len(out.shape) and out.shape[-1] == old:
                out.shape = ir.Shape([*list(out.shape)[:-1], new])
            stack.extend(u for u, _ in out.uses())


def export_embed_lazy(ckpt: Path, dtype: str, out_path: Path, opset: int) -> None:
    """``embed.onnx`` (``decoder_export.export_embed_graph``'s graph) over the checkpoint's table,
    read once while saving instead of held (and copied by onnx.helper) in memory."""
    import onnx
    import onnx_ir as ir

    from stages.lib.export.decoder import EXTERNAL_DATA_BYTES

    refs = _decoder_tensors(ckpt)
    ref = refs.get(_EMBED)
    if ref is None:
        raise missing_tensor(ckpt, _stored(refs, _EMBED), "the token embedding of embed.onnx")
    tensor = lazy_tensor(ref, torch_dtype(dtype), False, "embed_tokens.weight")
    table = ir.Value(name="embed_tokens.weight", type=ir.TensorType(tensor.dtype), shape=tensor.shape,
                     const_value=tensor)
    ids = ir.Value(name="input_ids", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape(["batch", "seq"]))
    node = ir.Node("", "Gather", [table, ids], [ir.AttrInt64("axis", 0)], num_outputs=1)
    out = node.outputs[0]
    out.name, out.type, out.shape = "inputs_embeds", table.type, ir.Shape(["batch", "seq", ref.shape[1]])
    graph = ir.Graph([ids], [out], nodes=[node], initializers=[table], name="embed", opset_imports={"": opset})
    # onnx's newest IR version can run ahead of onnxruntime/TensorRT parsers: the lowest the opset allows
    ir_version = onnx.helper.find_min_ir_version_for([onnx.helper.make_opsetid("", opset)])
    save(ir.Model(graph, ir_version=ir_version, producer_name="vlmforge"), out_path,
         tensor.nbytes > EXTERNAL_DATA_BYTES)
