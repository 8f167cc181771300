"""Graph facts the placement rules read: static shapes, matmul sizes, the pixel-reading layer.

What fuses is not here: placement reads the fuse stage's partitions (`fusion.annotate`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from stages.lib.qdq.rules import ModeRules

if TYPE_CHECKING:
    import onnx_ir as ir

Shapes = Mapping[str, tuple[int, ...]]


def shape_of(v: ir.Value | None, shapes: Shapes) -> tuple[int, ...] | None:
    """Static shape of v: calibration-observed first, then the graph's own, then a constant's."""
    if v is None:
        return None
    if v.name and v.name in shapes:
        return tuple(shapes[v.name])
    if v.shape is not None and all(isinstance(d, int) for d in v.shape):
        return tuple(d for d in v.shape if isinstance(d, int))
    if v.const_value is not None:
        return tuple(int(d) for d in v.const_value.shape.numpy())
    return None


def attrs(node: ir.Node) -> dict[str, Any]:
    return {k: a.value for k, a in node.attributes.items()}


def small_reason(node: ir.Node, rules: ModeRules, shapes: Shapes) -> str | None:
    """GEMV-like (M or N = 1) or tiny (K or N < min_dim) matmuls are not worth quantizing."""
    if node.op_type not in ("MatMul", "Gemm"):
        return None
    a, b = shape_of(node.inputs[0], shapes), shape_of(node.inputs[1], shapes)
    if a is None or b is None or len(a) < 1 or len(b) < 2:
        return None
    at = attrs(node)
    m = a[-2] if len(a) >= 2 else 1
    if node.op_type == "Gemm" and at.get("transA", 0):
        m = a[-1]
    k = a[-1] if not (node.op_type == "Gemm" and at.get("transA", 0)) else a[-2]
    n = b[-2] if (node.op_type == "Gemm" and at.get("transB", 0)) else b[-1]
    if m == rules.small.unit_dim or n == rules.small.unit_dim:
        return f"GEMV-like (M={m}, N={n})"
    if k < rules.small.min_dim or n < rules.small.min_dim:
        return f"tiny matmul (K={k}, N={n} < {rules.small.min_dim})"
    return None


_MOVES = frozenset({"Reshape", "Transpose", "Cast", "Identity", "Flatten", "Squeeze", "Unsqueeze"})


def reads_pixels(node: ir.Node) -> bool:
    """True if input 0 comes from a pixel graph input through data movement only."""
    v = node.inputs[0] if node.inputs else None
    while v is not None:
        if v.is_graph_input():
            return "pixel" in (v.name or "")
        p = v.producer()
        if p is None or p.op_type not in _MOVES:
            return False
        v = p.inputs[0]
    return False
