"""Insert Q/DQ pairs (int8, fp8) for a `Placement` into an onnx-ir model, in place.

Activations: QuantizeLinear→DequantizeLinear, per-tensor, zero point 0 (symmetric: TensorRT
accepts nothing else). Weights: stored already quantized (INT8 / FLOAT8E4M3FN initializer)
behind one per-channel DequantizeLinear, which TensorRT folds into the gemm. Scales use the
graph's float dtype so an fp16 graph stays strongly typed in fp16.

Weights stream: a weight is read once, a chunk of rows at a time (``Rows``), for its scales;
its codes are an ``ir.LazyTensor`` (``Deferred``) computed again from the source rows when the
model is saved, written chunk by chunk. A 16 GB graph never has more than one chunk of one
weight in memory, and the codes are the same bytes an eager pass gives: every step is
elementwise given the scales, or a max.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from stages.lib.qdq.graphio import const_tensor, float_dtype, set_opset
from stages.lib.qdq.placement import Placement, Site
from stages.lib.qdq.rules import rules_for

if TYPE_CHECKING:
    import onnx_ir as ir


CHUNK_BYTES = 16 * 2**20  # float32 bytes of one chunk of rows; a few temporaries of it are the working set


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
    """Symmetric quantization of `w` by a broadcastable `scale` into the storage dtype."""
    import ml_dtypes

    x = w.astype(np.float32) / scale.astype(np.float32)
    if qtype == "int8":
        return np.clip(np.rint(x), -128, 127).astype(np.int8)
    if qtype == "float8e4m3fn":
        return np.clip(x, -448.0, 448.0).astype(ml_dtypes.float8_e4m3fn)  # ml_dtypes rounds to nearest even
    if qtype == "int4":
        return np.clip(np.rint(x), -8, 7).astype(ml_dtypes.int4)
    raise ValueError(f"unknown storage type {qtype}")


def dequantize_array(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return q.astype(np.float32) * scale.astype(np.float32)


def _zero_point(qtype: str, shape: tuple[int, ...]) -> np.ndarray:
    import ml_dtypes

    dt = {"int8": np.int8, "float8e4m3fn": ml_dtypes.float8_e4m3fn, "int4": ml_dtypes.int4}[qtype]
    return np.zeros(shape, dtype=dt)


def _const(graph: ir.Graph, name: str, arr: np.ndarray) -> ir.Value:
    import onnx_ir as ir

    return _register(graph, name, lambda n: ir.tensor(arr, name=n))


def _register(graph: ir.Graph, name: str, make: Callable[[str], Any]) -> ir.Value:
    import onnx_ir as ir

    base, i = name, 0
    while name in graph.initializers:
        i += 1
        name = f"{base}_{i}"
    t = make(name)
    v = ir.Value(name=name, const_value=t, shape=ir.Shape(list(t.shape)))
    v.type = ir.TensorType(t.dtype)
    graph.register_initializer(v)
    return v


@dataclass(frozen=True)
class Rows:
    """A tensor read, or computed, along its first axis: ``get(r0, r1)`` gives rows r0:r1."""

    shape: tuple[int, ...]
    dtype: Any  # numpy dtype
    get: Callable[[int, int], np.ndarray]

    def chunks(self, multiple: int = 1) -> Iterator[tuple[int, int, np.ndarray]]:
        """(r0, r1, rows) in steps of a multiple of ``multiple`` rows, about CHUNK_BYTES as float32."""
        if not self.shape:
            yield 0, 1, self.get(0, 1)
            return
        step = max(multiple, CHUNK_BYTES // (4 * max(1, math.prod(self.shape[1:]))) // multiple * multiple)
        for r0 in range(0, self.shape[0], step):
            r1 = min(r0 + step, self.shape[0])
            yield r0, r1, self.get(r0, r1)

    def map(self, fn: Callable[[int, int, np.ndarray], np.ndarray], dtype: Any) -> Rows:
        """Rows computed from these rows (codes from weights, scaled weights)."""
        return Rows(self.shape, np.dtype(dtype), lambda r0, r1: fn(r0, r1, self.get(r0, r1)))


def rows_of(t: Any) -> Rows:
    """Row access to a weight: an external one is read from its file a range at a time, a
    ``Deferred`` one computed, an in-memory one sliced."""
    import onnx_ir as ir

    if isinstance(t, ir.LazyTensor) and isinstance(t.raw, Deferred):
        return t.raw.rows
    shape = tuple(int(x) for x in t.shape.numpy())
    dt = np.dtype(t.dtype.numpy())
    if isinstance(t, ir.ExternalTensor) and t.dtype.bitwidth >= 8 and shape:
        row = math.prod(shape[1:])

        def read(r0: int, r1: int) -> np.ndarray:
            off = (t.offset or 0) + r0 * row * dt.itemsize
            return np.fromfile(t.path, dtype=dt, count=(r1 - r0) * row, offset=off).reshape((r1 - r0, *shape[1:]))

        return Rows(shape, dt, read)
    arr = t.numpy()
    return Rows(shape, dt, (lambda r0, r1: arr) if not shape else (lambda r0, r1: arr[r0:r1]))


class Deferred:
    """A ``LazyTensor``'s function and what it evaluates to (itself, so ``rows_of`` finds the
    rows): the whole array on ``numpy()``, chunk by chunk on ``tofile`` (onnx-ir's external-data
    writer calls it, one tensor at a time). ``multiple`` keeps INT4 chunks whole bytes."""

    def __init__(self, rows: Rows, multiple: int = 1):
        self.rows, self.multiple = rows, multiple

    def __call__(self) -> Deferred:
        return self

    def numpy(self) -> np.ndarray:
        return np.ascontiguousarray(self.rows.get(0, self.rows.shape[0] if self.rows.shape else 1))

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        a = self.numpy()
        return a if dtype is None else a.astype(dtype)

    def tobytes(self) -> bytes:
        import onnx_ir as ir

        return ir.tensor(self.numpy()).tobytes()

    def tofile(self, file: Any) -> None:
        import onnx_ir as ir

        for _, _, chunk in self.rows.chunks(self.multiple):
            file.write(ir.tensor(np.ascontiguousarray(chunk)).tobytes())


def lazy_const(graph: ir.Graph, name: str, rows: Rows, multiple: int = 1) -> ir.Value:
    """An initializer whose bytes are ``rows``, computed when the model is saved (or read)."""
    import onnx_ir as ir

    d: Any = Deferred(rows, multiple)  # duck-typed: LazyTensor only calls numpy/tobytes/tofile on it
    dtype = ir.DataType.from_numpy(rows.dtype)
    return _register(graph, name, lambda n: ir.LazyTensor(d, dtype, ir.Shape(list(rows.shape)), name=n))


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


def _value(graph: ir.Graph, name: str) -> ir.Value:
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

    x = _value(graph, site.tensor)
    dt = x.dtype if x.dtype is not None else fdt
    s = _const(graph, f"{site.tensor}_scale", np.asarray(max(scale, _tiny(_np_float(dt))), dtype=_np_float(dt)))
    zp = _const(graph, f"{site.tensor}_zp", _zero_point(qtype, ()))
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

    t = const_tensor(_value(graph, site.tensor))
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

    qv = lazy_const(graph, f"{site.tensor}_quantized", w.map(codes, _zero_point(qtype, ()).dtype))
    sv = _const(graph, f"{site.tensor}_scale", scale)
    zv = _const(graph, f"{site.tensor}_zp", _zero_point(qtype, scale.shape))
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
