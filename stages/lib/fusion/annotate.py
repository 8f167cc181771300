"""Fusion annotations: how the fuse stage marks partitions that later stages must not cut.

Convention (also in docs/CONTRACT.md, "## Fusion annotations"). Every node of a fusible
partition carries three ONNX node ``metadata_props`` entries:

- ``vlmforge.fusion.group``: partition id, e.g. ``conv_act/0003`` or ``mha/0012`` (unique per graph);
- ``vlmforge.fusion.kind``: ``conv_act`` (Conv→[BN]→[residual Add]→[activation→[MaxPool]], at least one epilogue) or
  ``mha`` (canonical [q_scale Mul]→BMM1→[mask Add]→Softmax→BMM2, or one ONNX ``Attention`` node);
- ``vlmforge.fusion.role``: the node's place in it: ``conv``, ``bn``, ``residual_add``, ``act``,
  ``pool`` / ``q_scale``, ``bmm1``, ``mask_add``, ``softmax``, ``bmm2``, ``attention``.

The Q/DQ stage must not put a Q/DQ pair on an edge whose producer and consumer share a group
(TensorRT fuses across those edges only when nothing sits on them), with the exceptions the
TensorRT MHA kernels expect: the inputs of ``bmm1``/``bmm2`` (Q after ``q_scale``, K, the
softmax output and V) may be quantized. ``residual_add``'s input that does not come from the
partition is the skip input (quantize that one, never the fused branch). The same table is
written to ``fuse.json`` under ``groups`` by node name, for tools that drop node metadata.

``Partitions`` is how the Q/DQ placement reads these tags: it is its only knowledge of what
TensorRT fuses (no edge table or matcher of its own), so a rule added here moves placement too.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, NamedTuple

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


class Member(NamedTuple):
    """A node's place in a fusible partition."""

    group: str
    kind: str  # "conv_act" | "mha"
    role: str  # see the module docstring


class Partitions:
    """The partitions tagged on a graph's nodes (by the fuse stage), looked up by node.

    Read once per graph; node objects are the keys, so renaming nodes afterwards (placement
    names unnamed ones) does not lose a tag."""

    def __init__(self, graph: ir.Graph) -> None:
        self._of: dict[ir.Node, Member] = {}
        self._groups: dict[str, dict[str, ir.Node]] = {}
        for node in graph.all_nodes():
            group = node.metadata_props.get(GROUP)
            if group is None:
                continue
            m = Member(group, node.metadata_props.get(KIND, ""), node.metadata_props.get(ROLE, ""))
            self._of[node] = m
            self._groups.setdefault(group, {})[m.role] = node

    def __len__(self) -> int:
        return len(self._groups)

    def __iter__(self) -> Iterator[str]:
        return iter(self._groups)

    def of(self, node: ir.Node | None) -> Member | None:
        return None if node is None else self._of.get(node)

    def node(self, group: str, role: str) -> ir.Node | None:
        """The node playing ``role`` in ``group`` (None if the group has no such role)."""
        return self._groups.get(group, {}).get(role)

    def by_name(self) -> dict[str, Member]:
        """{node name: Member} (the table ``fuse.json`` writes under ``groups``, flattened)."""
        return {node.name or "": m for node, m in self._of.items()}

    def fused_edge(self, producer: ir.Node | None, consumer: ir.Node) -> str | None:
        """The group both ends of an edge share (TensorRT fuses across it), else None."""
        a, b = self.of(producer), self.of(consumer)
        return a.group if a is not None and b is not None and a.group == b.group else None


def clear(model: ir.Model) -> None:
    """Drop stale annotations (a re-run of the stage on its own output re-tags from scratch)."""
    for node in model.graph.all_nodes():
        for key in (GROUP, KIND, ROLE):
            node.metadata_props.pop(key, None)


def read_fusion_groups(model: onnx.ModelProto) -> dict[str, Member]:
    """``Partitions.by_name`` of a ``ModelProto`` (for tools holding a proto, not an IR model)."""
    import onnx_ir as ir

    return Partitions(ir.from_proto(model).graph).by_name()
