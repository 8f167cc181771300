"""One node cloned into another block of a stamped export (``decoder_stamp``, ``vision_stamp``).

Both stamp a traced block into the blocks the trace left out: the clone reads what ``vmap``
maps its inputs to (the new block's residual input, weights, past), its outputs are named after
the new block, and its name-scope metadata is relabelled, so quantize's block cuts, the layer
report and segment runners see every block as if it had been traced.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from pipeline.stage import StageError

if TYPE_CHECKING:
    import onnx_ir as ir

__all__ = ["clone_node", "relabel"]


def relabel(meta: dict[str, str], scope: str, src: int, dst: int) -> dict[str, str]:
    """Node metadata with ``<scope>.<src>`` (``layers.3``, ``blocks.3``) rewritten to ``<scope>.<dst>``."""
    pat = re.compile(rf"{scope}\.{src}(?!\d)")
    return {k: pat.sub(f"{scope}.{dst}", v) for k, v in meta.items()}


def clone_node(node: ir.Node, vmap: dict[ir.Value, ir.Value], scope: str, src: int, dst: int,
               on_subgraph: str) -> ir.Node:
    """``node`` of block ``src`` as a node of block ``dst``; its outputs are added to ``vmap``.

    ``on_subgraph``: the refusal for a node with a subgraph (``{node}`` is its name): its inner
    values would still be block ``src``'s."""
    import onnx_ir as ir

    if any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for a in node.attributes.values()):
        raise StageError(on_subgraph.format(node=node.name))
    clone = ir.Node(node.domain, node.op_type, [vmap.get(v, v) if v is not None else None for v in node.inputs],
                    list(node.attributes.values()), overload=node.overload, num_outputs=len(node.outputs),
                    version=node.version, name=f"{node.name}__{scope[0]}{dst}", doc_string=node.doc_string,
                    metadata_props=relabel(dict(node.metadata_props), scope, src, dst))
    for old, new in zip(node.outputs, clone.outputs, strict=True):
        new.name = f"{scope}.{dst}.{old.name}"
        new.type = old.type
        new.shape = old.shape.copy() if old.shape is not None else None
        vmap[old] = new
    return clone
