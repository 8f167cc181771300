"""Loading, saving and running graphs for the quantization passes."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import onnx
    import onnx_ir as ir
    import onnxruntime as ort

TWO_GB = 2**31 - 2**20


def load(path: Path | str) -> ir.Model:
    """Load with inferred value types: Q/DQ scales must match each tensor's float dtype."""
    import onnx_ir as ir

    return ir.from_proto(load_proto(path))


def load_proto(path: Path | str) -> onnx.ModelProto:
    """The model proto with inferred value types where onnx can infer them (not past 2 GB)."""
    import onnx

    proto = onnx.load(str(path), load_external_data=True)
    try:
        return onnx.shape_inference.infer_shapes(proto, data_prop=True)
    except Exception:  # noqa: BLE001 - past 2 GB or unknown ops: types then come from ORT
        return proto


def to_proto(model: ir.Model) -> onnx.ModelProto:
    import onnx_ir as ir

    return ir.to_proto(model)


def save(model: ir.Model, path: Path) -> None:
    """Save; weights go to `<name>.data` only when the model would pass the 2 GB proto limit."""
    import onnx

    proto = to_proto(model)
    if proto.ByteSize() > TWO_GB:
        onnx.save(proto, str(path), save_as_external_data=True, location=path.name + ".data")
    else:
        onnx.save(proto, str(path))


def check(model: ir.Model | onnx.ModelProto) -> None:
    import onnx

    proto = model if isinstance(model, onnx.ModelProto) else to_proto(model)
    if proto.ByteSize() >= TWO_GB:  # the checker takes a path (with external data) past 2 GB
        with _spilled(proto) as path:
            onnx.checker.check_model(str(path))
        return
    onnx.checker.check_model(proto, full_check=True)


class _spilled:
    """A temporary on-disk copy with external data, for protos protobuf cannot serialize."""

    def __init__(self, proto: Any):
        self.proto = proto

    def __enter__(self) -> Path:
        import tempfile

        import onnx_ir as ir

        self.dir = tempfile.TemporaryDirectory(prefix="vlmforge-qdq-")
        path = Path(self.dir.name) / "model.onnx"
        # via onnx-ir: onnx.save(save_as_external_data=True) would rewrite the caller's proto
        ir.save(ir.from_proto(self.proto), path, external_data="model.onnx.data")
        return path

    def __exit__(self, *exc: object) -> None:
        self.dir.cleanup()


def session(model: ir.Model | onnx.ModelProto | Path, optimize: bool = False) -> ort.InferenceSession:
    """ORT CPU session. Quantized graphs run with ORT_DISABLE_ALL: its Q/DQ fusions change
    rounding and reject FP8 (NOTES §3)."""
    import onnx
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_BASIC if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    so.log_severity_level = 3
    so.intra_op_num_threads = 2
    if isinstance(model, Path):
        return ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])
    proto = model if isinstance(model, onnx.ModelProto) else to_proto(model)
    if proto.ByteSize() >= TWO_GB:
        with _spilled(proto) as path:  # ORT reads the weights at session creation
            return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])


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


def const_array(v: ir.Value) -> np.ndarray | None:
    """The numpy value of a constant input (initializer or Constant node), else None."""
    if v.const_value is not None:
        return v.const_value.numpy()
    p = v.producer()
    if p is not None and p.op_type == "Constant" and "value" in p.attributes:
        return p.attributes["value"].value.numpy()
    return None


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
