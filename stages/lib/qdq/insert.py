"""Insert Q/DQ pairs (int8, fp8) for a `Placement` into an onnx-ir model, in place.

Activations: QuantizeLinear→DequantizeLinear, per-tensor, zero point 0 (symmetric: TensorRT
accepts nothing else). Weights: stored already quantized (INT8 / FLOAT8E4M3FN initializer)
behind one per-channel DequantizeLinear, which TensorRT folds into the gemm. Scales use the
graph's float dtype so an fp16 graph stays strongly typed in fp16.

Weights stream (``stages.lib.qdq.streamed_weights``): a weight is read once, a chunk of rows at
a time, for its scales; its codes are computed again from the source rows when the model is
saved, so the codes are the same bytes an eager pass gives: every step is elementwise given the
scales, or a max.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from stages.lib.dtypes import qtype_numpy
from stages.lib.qdq.graphio import const_tensor, float_dtype, set_opset
from stages.lib.qdq.placement import Placement, Site
from stages.lib.qdq.rules import rules_for
from stages.lib.qdq.streamed_weights import lazy_const, register_initializer, rows_of

if TYPE_CHECKING:
    import onnx_ir as ir


class MissingRange(ValueError):
    """An activation site has no calibrated range."""


@dataclass
class InsertStats:
    qdq_pairs: int = 0  # activation Q→DQ pairs
    weight_dq: int = 0  # quantized weights (DQ-only)
    scales: dict[str, float] = field(default_factory=dict)  # activation tensor -> scale

    def as_dict(self) -> dict[str, Any]:
        return {"qdq_pairs": self.qdq_pairs, "weight_dq": self.weight_dq}


def _np_float(dtype: Any) -> Any:
    return dtype.numpy()


def _tiny(np_dtype: Any) -> float:
    # Smallest positive scale the dtype holds (fp16: 2**-24): a zero scale divides by zero.
    return float(np.finfo(np_dtype).smallest_subnormal)


def quantize_array(w: np.ndarray, scale: np.ndarray, qtype: str) -> np.ndarray:
    """Symmetric quantization of `w` by a broadcastable `scale` into the storage dtype: integer
    codes rounded half to even and clipped to the type's range (int8 [-128, 127], int4 [-8, 7]);
    FP8 clipped to its largest finite value (448), ml_dtypes' cast rounding to nearest even."""
    import ml_dtypes

    dt = qtype_numpy(qtype)
    x = w.astype(np.float32) / scale.astype(np.float32)
    if dt.name.startswith("float"):
        top = float(ml_dtypes.finfo(dt).max)
        return np.clip(x, -top, top).astype(dt)
    info = ml_dtypes.iinfo(dt)
    return np.clip(np.rint(x), info.min, info.max).astype(dt)


def zero_point(qtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """Zeros of the storage dtype: the symmetric zero point TensorRT requires."""
    return np.zeros(shape, dtype=qtype_numpy(qtype))


def new_const(graph: ir.Graph, name: str, arr: np.ndarray) -> ir.Value:
    """A new in-memory initializer holding ``arr``, named ``name`` (``name_1``, ... when taken)."""
    import onnx_ir as ir

    return register_initializer(graph, name, lambda n: ir.tensor(arr, name=n))


def site_amax(site: Site, placement: Placement, amax: Mapping[str, float]) -> float:
    """Calibrated |max| for an activation site; Concat groups take the largest member."""
    if site.fixed_amax is not None:
        return site.fixed_amax
    names = placement.groups.get(site.group, [site.tensor]) if site.group else [site.tensor]
    vals = [float(amax[n]) for n in names if n in amax]
    if site.tensor not in amax:
        raise MissingRange(f"no calibrated range for tensor {site.tensor!r} (consumer {site.uses[0][0]})")
    return max(vals)


def _rewire(graph: ir.Graph, site: Site, new: ir.Value) -> None:
    nodes = {n.name: n for n in graph}
    for node_name, slot in site.uses:
        nodes[node_name].replace_input_with(slot, new)


def value_of(graph: ir.Graph, name: str) -> ir.Value:
    """The graph input, initializer or node output called ``name``."""
    for v in graph.inputs:
        if v.name == name:
            return v
    if name in graph.initializers:
        return graph.initializers[name]
    for n in graph:
        for o in n.outputs:
            if o.name == name:
                return o
    raise KeyError(f"tensor {name!r} not in graph")


def insert_activation(graph: ir.Graph, site: Site, scale: float, qtype: str, fdt: Any) -> ir.Value:
    import onnx_ir as ir

    x = value_of(graph, site.tensor)
    dt = x.dtype if x.dtype is not None else fdt
    s = new_const(graph, f"{site.tensor}_scale", np.asarray(max(scale, _tiny(_np_float(dt))), dtype=_np_float(dt)))
    zp = new_const(graph, f"{site.tensor}_zp", zero_point(qtype, ()))
    q = ir.Node("", "QuantizeLinear", [x, s, zp], name=f"{site.tensor}_QuantizeLinear", num_outputs=1)
    dq = ir.Node("", "DequantizeLinear", [q.outputs[0], s, zp], name=f"{site.tensor}_DequantizeLinear", num_outputs=1)
    q.outputs[0].name = f"{site.tensor}_quantized"
    dq.outputs[0].name = f"{site.tensor}_dequantized"
    dq.outputs[0].type = ir.TensorType(dt)
    if x.shape is not None:
        dq.outputs[0].shape = x.shape
    graph.extend([q, dq])
    _rewire(graph, site, dq.outputs[0])
    return dq.outputs[0]


def insert_weight(graph: ir.Graph, site: Site, qtype: str, qmax: float) -> None:
    """Per-channel symmetric weight, stored quantized behind a DequantizeLinear(axis)."""
    import onnx_ir as ir

    t = const_tensor(value_of(graph, site.tensor))
    if t is None:
        raise ValueError(f"weight {site.tensor} is not a constant")
    w = rows_of(t)
    fdt = w.dtype if w.dtype in (np.float16, np.float32) else np.float32
    axis = site.axis if site.axis is not None else 0
    red = tuple(i for i in range(len(w.shape)) if i != axis)
    amax = np.zeros(w.shape[axis] if w.shape else (), np.float32)
    for r0, r1, c in w.chunks():  # a max, so the same value whatever the chunks
        part = np.max(np.abs(c.astype(np.float32)), axis=red)
        if axis == 0:
            amax[r0:r1] = part
        else:
            amax = part if r0 == 0 else np.maximum(amax, part)
    # Round the scale to the graph dtype first, so the stored codes match what DQ multiplies.
    scale = np.maximum(amax / qmax, _tiny(fdt)).astype(fdt)
    bshape = [1] * len(w.shape)
    bshape[axis] = -1

    def codes(r0: int, r1: int, c: np.ndarray) -> np.ndarray:
        return quantize_array(c, (scale[r0:r1] if axis == 0 else scale).reshape(bshape), qtype)

    qv = lazy_const(graph, f"{site.tensor}_quantized", w.map(codes, zero_point(qtype, ()).dtype))
    sv = new_const(graph, f"{site.tensor}_scale", scale)
    zv = new_const(graph, f"{site.tensor}_zp", zero_point(qtype, scale.shape))
    replace_weight_with_dq(graph, site, [qv, sv, zv], [ir.AttrInt64("axis", axis)], w.shape, fdt)


def replace_weight_with_dq(graph: ir.Graph, site: Site, inputs: list[ir.Value], attrs: list[Any],
                           shape: tuple[int, ...], fdt: Any) -> None:
    """Feed the site's consumer from a weight DequantizeLinear (INT8/FP8 per-channel or INT4 block)."""
    import onnx_ir as ir

    dq = ir.Node("", "DequantizeLinear", inputs, attrs, name=f"{site.tensor}_DequantizeLinear", num_outputs=1)
    dq.outputs[0].name = f"{site.tensor}_dequantized"
    dq.outputs[0].type = ir.TensorType(ir.DataType.FLOAT16 if fdt == np.float16 else ir.DataType.FLOAT)
    dq.outputs[0].shape = ir.Shape(list(shape))
    graph.extend([dq])
    _rewire(graph, site, dq.outputs[0])


def drop_unused_initializers(graph: ir.Graph) -> None:
    for name in [n for n, v in graph.initializers.items() if not list(v.uses()) and not v.is_graph_output()]:
        del graph.initializers[name]


def apply(model: ir.Model, placement: Placement, amax: Mapping[str, float]) -> InsertStats:
    """Insert every site of an int8/fp8 placement; `amax` maps activation tensors to |max|."""
    rules = rules_for(placement.mode)
    if rules.weights != "per-channel":
        raise ValueError(f"insert.apply handles per-channel modes; use int4.apply for {placement.mode}")
    set_opset(model, rules.opset_min)
    graph, fdt = model.graph, float_dtype(model)
    stats = InsertStats()
    for site in placement.sites:
        if site.kind == "weight":
            insert_weight(graph, site, rules.qtype, rules.qmax)
            stats.weight_dq += 1
        else:
            scale = site_amax(site, placement, amax) / rules.qmax
            insert_activation(graph, site, scale, rules.qtype, fdt)
            stats.qdq_pairs += 1
            stats.scales[site.tensor] = scale
    drop_unused_initializers(graph)
    graph.sort()
    return stats
