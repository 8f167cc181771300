"""Graph pattern matchers the placement rules use (shapes, fusion chains, attention, pixels)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from stages.lib.qdq.rules import FUSED_EDGES, ModeRules

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


def through(v: ir.Value, ops: Iterable[str]) -> ir.Node | None:
    """The producer of v, looking through BatchNormalization (folded into Conv by TensorRT)."""
    p = v.producer()
    if p is not None and p.op_type == "BatchNormalization":
        p = p.inputs[0].producer() if p.inputs[0] is not None else None
    return p if p is not None and p.op_type in ops else None


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


def inside_fusion(v: ir.Value) -> bool:
    """True if v flows along an edge TensorRT fuses (Conv→BN, BN→ReLU, ReLU→MaxPool, ...)."""
    p = v.producer()
    if p is None:
        return False
    return any((p.op_type, u.node.op_type) in FUSED_EDGES for u in v.uses())


def mha_pattern(bmm1: ir.Node, rules: ModeRules, shapes: Shapes) -> tuple[ir.Value, ir.Node] | None:
    """Match BMM1→(Mul|Div)→(Add mask)→Softmax→BMM2, looking through precision Casts (exporters
    run softmax in fp32 inside fp16 graphs); return (the tensor BMM2 reads as probabilities, BMM2)."""
    hd = shape_of(bmm1.inputs[0], shapes)
    if hd is None or not (rules.head_dim[0] < hd[-1] <= rules.head_dim[1]):
        return None

    def next_node(v: ir.Value) -> ir.Node | None:
        uses = list(v.uses())
        return uses[0].node if len(uses) == 1 else None

    node, seen = next_node(bmm1.outputs[0]), set()
    while node is not None and node.op_type != "Softmax":
        # at most one scale and one mask add, any number of casts
        kind = {"Mul": "scale", "Div": "scale", "Add": "mask", "Cast": None}.get(node.op_type, "stop")
        if kind == "stop" or (kind is not None and kind in seen):
            return None
        if kind:
            seen.add(kind)
        node = next_node(node.outputs[0])
    if node is None:
        return None
    v = node.outputs[0]
    nxt = next_node(v)
    while nxt is not None and nxt.op_type == "Cast":
        v, nxt = nxt.outputs[0], next_node(nxt.outputs[0])
    if nxt is None or nxt.op_type != "MatMul" or nxt.inputs[0] is not v:
        return None
    return v, nxt
