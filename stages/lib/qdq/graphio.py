"""Loading, saving and running graphs for the quantization passes.

Which tensors a model holds and how many bytes they are (what decides whether a graph fits one
protobuf message) is ``stages.lib.qdq.model_tensors``; this module decides, from that, how each
graph is loaded, saved, checked and opened in onnxruntime.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from stages.lib.qdq.model_tensors import fits_in_proto, has_external, ir_tensors, proto_tensors, tensor_bytes

if TYPE_CHECKING:
    import onnx
    import onnx_ir as ir
    import onnxruntime as ort

EXTERNAL_DATA_BYTES = 256 * 1024**2  # saved graphs whose tensors pass this keep them in <name>.data


class _in_memory:
    """Within the block, every external tensor of ``model`` (initializer or attribute) is an
    in-memory copy, so a save writes it inline; the model is restored on exit."""

    def __init__(self, model: ir.Model, attributes_only: bool = False):
        self.model, self.attributes_only = model, attributes_only
        self.undo: list[Any] = []

    def __enter__(self) -> ir.Model:
        import onnx_ir as ir

        found = [(w, t) for w, t in ir_tensors(self.model) if isinstance(t, ir.ExternalTensor)]
        if self.attributes_only:
            found = [(w, t) for w, t in found if not isinstance(w, ir.Value)]
        for (where, old), new in zip(found, ir.external_data.convert_tensors_from_external([t for _, t in found]),
                                     strict=True):
            self.undo.append((where, old))
            self._set(where, new)
        return self.model

    def __exit__(self, *exc: object) -> None:
        for where, old in reversed(self.undo):
            self._set(where, old)
        self.undo.clear()

    @staticmethod
    def _set(where: Any, tensor: Any) -> None:
        import onnx_ir as ir

        if isinstance(where, ir.Value):
            where.const_value = tensor
            return
        node, name, i = where
        if i is None:
            node.attributes[name] = ir.AttrTensor(name, tensor)
        else:
            ts = list(node.attributes[name].value)
            ts[i] = tensor
            node.attributes[name] = ir.AttrTensors(name, ts)


def load(path: Path | str, in_file: bool = False) -> ir.Model:
    """Load with inferred value types: Q/DQ scales must match each tensor's float dtype.

    A graph past the proto limit (any graph, with ``in_file``) keeps its weights in its external
    data file (``ir.ExternalTensor``s with absolute locations, unread until asked, so a proto
    made from the model still finds them): ``session``/``check``/``save`` then go through a
    file, never one in-memory proto."""
    import onnx_ir as ir

    return ir.from_proto(load_proto(path, lazy=True, in_file=in_file))


def load_proto(path: Path | str, lazy: bool = False, in_file: bool = False) -> onnx.ModelProto:
    """The model proto, weights in memory, with inferred value types where onnx can infer them.
    Past the proto limit, types are inferred on the graph without its weights (shape inference
    serializes the model; the weights are not needed), then the weights are read in, or with
    ``lazy`` left in their file, their locations made absolute. ``in_file``: every external
    tensor stays in its file whatever the size (the structure quantize builds candidates from:
    each ``ir.from_proto`` of it is a fresh model that costs no weight bytes)."""
    import onnx
    from onnx.external_data_helper import load_external_data_for_model

    proto = onnx.load(str(path), load_external_data=False)
    base_dir = Path(path).absolute().parent  # as onnx.load: beside the path given, links not followed
    big = not fits_in_proto(proto)
    keep = in_file or (big and lazy)
    if not big and not keep:
        load_external_data_for_model(proto, str(base_dir))
    try:
        proto = onnx.shape_inference.infer_shapes(proto, data_prop=True)
    except Exception:  # noqa: BLE001 - unknown ops: types then come from ORT
        pass
    if keep:
        for t in proto_tensors(proto):
            for e in t.external_data if t.data_location == onnx.TensorProto.EXTERNAL else ():
                if e.key == "location":
                    e.value = str(base_dir / e.value)
    elif big:
        load_external_data_for_model(proto, str(base_dir))
    return proto


def to_proto(model: ir.Model) -> onnx.ModelProto:
    import onnx_ir as ir

    return ir.to_proto(model)


def save(model: ir.Model, path: Path, external_above: int | None = None) -> None:
    """Save a graph that is whole in its own folder. Tensors totalling more than
    ``external_above`` bytes (None: EXTERNAL_DATA_BYTES) go to ``<name>.data`` beside it, written
    here one tensor at a time (tensors external elsewhere are copied, computed ones computed
    as they are written); otherwise every tensor is written inline. ``onnx_ir.save`` without
    ``external_data`` would keep external tensors pointing at their old location."""
    import onnx_ir as ir

    path = Path(path)
    if tensor_bytes(model) > (EXTERNAL_DATA_BYTES if external_above is None else external_above):
        with _in_memory(model, attributes_only=True):  # ir.save externalizes initializers only
            ir.save(model, path, external_data=path.name + ".data")
    else:
        with _in_memory(model):
            ir.save(model, path)


def check(model: ir.Model | onnx.ModelProto | Path) -> None:
    """onnx.checker (full check). A graph past the proto limit, or one with external tensors, is
    checked by path: from its file, or from a temporary copy with external data."""
    import onnx

    if isinstance(model, (str, Path)):
        onnx.checker.check_model(str(model), full_check=True)
        return
    if _needs_file(model):
        with spilled(model) as path:
            onnx.checker.check_model(str(path), full_check=True)
        return
    proto = model if isinstance(model, onnx.ModelProto) else to_proto(model)
    onnx.checker.check_model(proto, full_check=True)


def _needs_file(model: ir.Model | onnx.ModelProto) -> bool:
    """Past the proto limit, or with external tensors (an in-memory proto loses their folder)."""
    return not fits_in_proto(model) or has_external(model)


class spilled:
    """A temporary on-disk copy with external data, for models one proto cannot carry (and for
    the block runner, which reads graphs from files). ``folder``: where the temporary folder
    goes (a candidate of a big graph is as big as the graph: keep it off a RAM-backed /tmp)."""

    def __init__(self, model: Any, folder: Path | None = None):
        self.model, self.folder = model, folder

    def __enter__(self) -> Path:
        import tempfile

        import onnx_ir as ir

        self.dir = tempfile.TemporaryDirectory(prefix="vlmforge-qdq-", dir=self.folder)
        path = Path(self.dir.name) / "model.onnx"
        # via onnx-ir: onnx.save(save_as_external_data=True) would rewrite the caller's proto
        m = self.model if isinstance(self.model, ir.Model) else ir.from_proto(self.model)
        save(m, path, external_above=0)
        return path

    def __exit__(self, *exc: object) -> None:
        self.dir.cleanup()


def session(model: ir.Model | onnx.ModelProto | Path, optimize: bool = False) -> ort.InferenceSession:
    """ORT CPU session. Quantized graphs run with ORT_DISABLE_ALL: its Q/DQ fusions change
    rounding and reject FP8 (docs/FIELD_NOTES.md §3). A file is opened by path (its external data beside it);
    a model past the proto limit runs from a temporary copy with external data."""
    import onnx

    from stages.lib.ortsession import ort_session

    def open_(src: str | Path | bytes) -> ort.InferenceSession:
        return ort_session(src, optimization="basic" if optimize else "none", threads=2)

    if isinstance(model, (str, Path)):
        return open_(model)
    if _needs_file(model):
        with spilled(model) as path:  # ORT reads the weights at session creation
            return open_(path)
    proto = model if isinstance(model, onnx.ModelProto) else to_proto(model)
    return open_(proto.SerializeToString())


def run(sess: ort.InferenceSession, feed: Mapping[str, np.ndarray], names: Sequence[str] | None = None) -> dict[str, Any]:
    wanted = {i.name for i in sess.get_inputs()}
    outs = sess.run(list(names) if names else None, {k: v for k, v in feed.items() if k in wanted})
    return dict(zip(names or [o.name for o in sess.get_outputs()], outs, strict=True))


def float_dtype(model: ir.Model) -> Any:
    """The graph's float dtype (ir.DataType): FLOAT16 for fp16 exports, FLOAT otherwise."""
    import onnx_ir as ir

    floats = (ir.DataType.FLOAT16, ir.DataType.FLOAT, ir.DataType.BFLOAT16)
    for v in list(model.graph.inputs) + list(model.graph.initializers.values()):
        if v.dtype in floats:
            return v.dtype
    return ir.DataType.FLOAT


def const_tensor(v: ir.Value | None) -> ir.TensorProtocol | None:
    """The tensor of a constant input (initializer or Constant node), unread, else None."""
    if v is None:
        return None
    if v.const_value is not None:
        return v.const_value
    p = v.producer()
    if p is not None and p.op_type == "Constant" and "value" in p.attributes:
        return p.attributes["value"].value  # type: ignore[no-any-return]
    return None


def const_shape(v: ir.Value | None) -> tuple[int, ...] | None:
    """The shape of a constant input, from its declaration (no bytes read)."""
    t = const_tensor(v)
    return None if t is None else tuple(int(d) for d in t.shape.numpy())


def const_array(v: ir.Value) -> np.ndarray | None:
    """The numpy value of a constant input (initializer or Constant node), else None. An
    external tensor is read into a private copy, not mapped: ``ExternalTensor.numpy`` keeps its
    whole file mapped and the pages it touched resident until released."""
    import onnx_ir as ir

    t = const_tensor(v)
    if isinstance(t, ir.ExternalTensor) and t.dtype.bitwidth >= 8:
        return np.fromfile(t.path, dtype=t.dtype.numpy(), count=t.size, offset=t.offset or 0).reshape(
            t.shape.numpy())
    return None if t is None else t.numpy()


def set_opset(model: ir.Model, minimum: int) -> int:
    """Raise the default-domain opset to at least `minimum`; returns the opset in force."""
    cur = model.opset_imports.get("", model.graph.opset_imports.get("", 1))
    if cur >= minimum:
        return cur
    # GroupNormalization changed its scale/bias layout at opset 21: raising silently would
    # change the model's meaning, so refuse.
    if cur < 21 <= minimum and any(n.op_type == "GroupNormalization" for n in model.graph):
        raise ValueError("cannot raise opset to 21: GroupNormalization changed meaning at opset 21")
    model.opset_imports[""] = minimum
    model.graph.opset_imports[""] = minimum
    return minimum
