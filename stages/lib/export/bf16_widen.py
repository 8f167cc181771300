"""A BF16 graph widened to FP32, so onnxruntime's CPU provider can run it (it has no BF16 kernels).

Both exporters (vision and decoder) check a BF16 export's parity this way: every BF16
initializer, Constant tensor, Cast target and declared value type becomes FP32, while the weights
keep their BF16-rounded values, so parity still sees the weight rounding; BF16 activation
rounding is not simulated (the stages' reports say so). The widened copy is a temporary, never an
artefact.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def bf16_as_fp32(onnx_path: Path, dst: Path) -> Path:
    """The BF16 graph with every BF16 tensor/cast widened to FP32, for onnxruntime CPU (no BF16
    kernels). Weights keep their BF16-rounded values, so parity still sees the weight rounding;
    activation rounding is not simulated (the report says so)."""
    import numpy as np
    import onnx
    from onnx import TensorProto, numpy_helper

    model = onnx.load(str(onnx_path))
    bf16, f32 = TensorProto.BFLOAT16, TensorProto.FLOAT

    def widen(t: Any) -> Any:
        w = numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float32), t.name)
        return w

    g = model.graph
    for i, t in enumerate(g.initializer):
        if t.data_type == bf16:
            g.initializer[i].CopyFrom(widen(t))
    for node in g.node:
        for a in node.attribute:
            if node.op_type == "Cast" and a.name == "to" and a.i == bf16:
                a.i = f32
            if a.type == onnx.AttributeProto.TENSOR and a.t.data_type == bf16:
                a.t.CopyFrom(widen(a.t))
    for v in [*g.input, *g.output, *g.value_info]:
        if v.type.tensor_type.elem_type == bf16:
            v.type.tensor_type.elem_type = f32
    from stages.lib.qdq.graphio import EXTERNAL_DATA_BYTES
    from stages.lib.qdq.model_tensors import tensor_bytes

    big = tensor_bytes(model) > EXTERNAL_DATA_BYTES  # widened FP32 is twice the BF16 bytes
    onnx.save(model, str(dst), save_as_external_data=big, location=dst.name + ".data")
    return dst
