"""A bring-your-own FP32 graph brought to FP16 after the rewrites (``export.dtype: fp16``).

Why here and not at import: TensorRT builds strongly typed networks, so an FP32 graph is an FP32
engine, Q/DQ or not (the PP-OCRv4 recognizer: 83 layers, 14.1 MB and no fused MHA in FP32;
71 layers, 8.4 MB and 2 of 2 attention blocks in one ``_gemm_mha_v2`` kernel in FP16, TensorRT-RTX
1.7, SM89). Converting after BatchNorm is folded into the convolutions avoids the overflow that
gave ModelOpt's FP16 conversion an all-zero detector map (a running variance above 65504).

Why by hand: onnxruntime's ``convert_float_to_float16`` (also onnxconverter-common's) wrote an
invalid PP-OCRv4 detector (Resize scales kept FP32 but declared FP16, two Casts writing one
name, nodes out of order), and onnx-ir / onnxscript have no dtype pass. The rule is short:
every FP32 weight and value becomes FP16 (weights clipped into FP16's range), ``Cast(to=FLOAT)``
casts to FP16, Resize's roi/scales stay FP32 (the op requires it), and the graph's FP32 inputs
and outputs keep their type behind one Cast each, so the io spec, the feeds and the reference
comparison do not change.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import onnx_ir as ir

# inputs that stay FP32 whatever the graph computes in (op type -> input indices)
FLOAT_ONLY_INPUTS = {"Resize": (1, 2), "Upsample": (1,)}
# float-typed attributes naming an output type
DTYPE_ATTRS = {"Cast": "to", "RandomNormal": "dtype", "RandomUniform": "dtype", "EyeLike": "dtype",
               "RandomNormalLike": "dtype", "RandomUniformLike": "dtype"}


def is_float32(model: ir.Model) -> bool:
    """True when the graph computes in FP32: an FP32 weight feeds some op (other than the inputs
    that are FP32 whatever the graph computes in); with no float weights, an FP32 graph input."""
    import onnx_ir as ir

    floats = [v for v in model.graph.initializers.values() if v.dtype is not None and v.dtype.is_floating_point()]
    if not floats:
        return any(v.dtype == ir.DataType.FLOAT for v in model.graph.inputs)
    return any(v.dtype == ir.DataType.FLOAT and any(idx not in FLOAT_ONLY_INPUTS.get(user.op_type, ())
                                                    for user, idx in v.uses()) for v in floats)


def to_float16(model: ir.Model) -> int:
    """Rewrite ``model`` in place to compute in FP16; returns how many values changed type."""
    import numpy as np
    import onnx_ir as ir

    f32, f16 = ir.DataType.FLOAT, ir.DataType.FLOAT16
    graph = model.graph
    keep = {id(node.inputs[k]) for node in graph.all_nodes()
            for k in FLOAT_ONLY_INPUTS.get(node.op_type, ()) if k < len(node.inputs) and node.inputs[k] is not None}
    changed = 0
    limit = float(np.finfo(np.float16).max)
    for name, init in list(graph.initializers.items()):
        if init.dtype != f32 or id(init) in keep or init.const_value is None:
            continue
        arr = np.clip(init.const_value.numpy(), -limit, limit).astype(np.float16)
        init.const_value = ir.tensor(arr, name=name)
        init.dtype = f16
        changed += 1
    for node in graph.all_nodes():
        for key in ("value",) if node.op_type in ("Constant", "ConstantOfShape") else ():
            t = node.attributes[key].as_tensor() if key in node.attributes else None
            if t is not None and t.dtype == f32:
                node.attributes[key] = ir.AttrTensor(key, ir.tensor(t.numpy().astype(np.float16)))
        attr = DTYPE_ATTRS.get(node.op_type)
        if attr and attr in node.attributes and node.attributes[attr].as_int() == f32.value:
            node.attributes[attr] = ir.AttrInt64(attr, f16.value)
        for out in node.outputs:
            if out.dtype == f32 and id(out) not in keep:
                out.dtype = f16
                changed += 1
    _retype_boundary(graph, f32, f16)
    return changed


def _retype_boundary(graph: ir.Graph, f32: ir.DataType, f16: ir.DataType) -> None:
    """The FP32 graph inputs feed one Cast to FP16; the FP32 outputs come out of one Cast back."""
    import onnx_ir as ir

    for inp in graph.inputs:
        if inp.dtype != f32:
            continue
        cast = ir.node("Cast", [inp], attributes={"to": f16.value}, name=f"{inp.name}_to_fp16")
        cast.outputs[0].name, cast.outputs[0].dtype, cast.outputs[0].shape = f"{inp.name}_fp16", f16, inp.shape
        for user, idx in list(inp.uses()):
            if user is not cast:
                user.replace_input_with(idx, cast.outputs[0])
        graph.insert_before(graph[0], cast)
    for i, out in enumerate(list(graph.outputs)):
        if out.dtype != f16:
            continue
        cast = ir.node("Cast", [out], attributes={"to": f32.value}, name=f"{out.name}_to_fp32")
        new = cast.outputs[0]
        new.dtype, new.shape = f32, out.shape
        name = out.name
        out.name = f"{name}_fp16"
        new.name = name
        graph.append(cast)
        graph.outputs[i] = new
