"""Fusion annotations: how the fuse stage marks partitions that later stages must not cut.

Convention (also in docs/CONTRACT.md, "## Fusion annotations"). Every node of a fusible
partition carries three ONNX node ``metadata_props`` entries:

- ``vlmforge.fusion.group``: partition id, e.g. ``conv_act/0003`` or ``mha/0012`` (unique per graph);
- ``vlmforge.fusion.kind``: ``conv_act`` (Conv→[BN]→[residual Add]→activation→[MaxPool]) or
  ``mha`` (canonical [q_scale Mul]→BMM1→[mask Add]→Softmax→BMM2, or one ONNX ``Attention`` node);
- ``vlmforge.fusion.role``: the node's place in it: ``conv``, ``bn``, ``residual_add``, ``act``,
  ``pool`` / ``q_scale``, ``bmm1``, ``mask_add``, ``softmax``, ``bmm2``, ``attention``.

The Q/DQ stage must not put a Q/DQ pair on an edge whose producer and consumer share a group
(TensorRT fuses across those edges only when nothing sits on them), with the exceptions the
TensorRT MHA kernels expect: the inputs of ``bmm1``/``bmm2`` (Q after ``q_scale``, K, the
softmax output and V) may be quantized. ``residual_add``'s input that does not come from the
partition is the skip input (quantize that one, never the fused branch). The same table is
written to ``fuse.json`` under ``groups`` by node name, for tools that drop node metadata.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import onnx
    import onnx_ir as ir

GROUP = "vlmforge.fusion.group"
KIND = "vlmforge.fusion.kind"
ROLE = "vlmforge.fusion.role"


def tag(node: ir.Node, group: str, kind: str, role: str) -> None:
    node.metadata_props[GROUP] = group
    node.metadata_props[KIND] = kind
    node.metadata_props[ROLE] = role


def groups_of(model: ir.Model) -> dict[str, dict[str, Any]]:
    """{group id: {"kind", "nodes": {node name: role}}} from the node metadata of ``model``."""
    out: dict[str, dict[str, Any]] = {}
    for node in model.graph.all_nodes():
        g = node.metadata_props.get(GROUP)
        if g is None:
            continue
        entry = out.setdefault(g, {"kind": node.metadata_props.get(KIND), "nodes": {}})
        entry["nodes"][node.name] = node.metadata_props.get(ROLE)
    return dict(sorted(out.items()))


def read_fusion_groups(model: onnx.ModelProto) -> dict[str, tuple[str, str, str]]:
    """For the Q/DQ stage: node name -> (group, kind, role), read from an ``onnx.ModelProto``."""
    table: dict[str, tuple[str, str, str]] = {}
    for node in model.graph.node:
        props = {p.key: p.value for p in node.metadata_props}
        if GROUP in props:
            table[node.name] = (props[GROUP], props.get(KIND, ""), props.get(ROLE, ""))
    return table


def clear(model: ir.Model) -> None:
    """Drop stale annotations (a re-run of the stage on its own output re-tags from scratch)."""
    for node in model.graph.all_nodes():
        for key in (GROUP, KIND, ROLE):
            node.metadata_props.pop(key, None)
