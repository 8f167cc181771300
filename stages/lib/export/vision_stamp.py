"""Vision export that costs the same at any depth: trace one block of each kind, stamp the rest.

Tracing the whole ViT grows with its depth: the exporter's decompositions re-trace every block
(measured on the 32-block Qwen2.5-VL-3B layout: torch.export 8.7 s, decompositions 21.2 s of a
39 s export). Blocks of one kind are the same graph with other weights, so, as the decoder
export does (``decoder_stamp``):

1. the template is the encoder with only some blocks run (``patches.vision.export_module(...,
   blocks=...)``): the first block of each kind (``patches.vision.block_kinds``: its attention
   mask, whether it is an FP32 island), every block a deepstack merger reads, and the last;
   each keeps its own weights and its name scope ``visual.blocks.<i>``;
2. every other block is a clone of its kind's first block (``stamp_blocks``), chained on the
   residual stream in block order, with initializers ``visual.blocks.<i>.*`` bound to that
   block's own tensors (the loaded encoder's, not copies).

Unlike the decoder there is no template of random values: the encoder is small enough to be
loaded (one copy, in the export dtype), and its initializers carry their parameter names.
Anything that does not fit (a folded weight without a parameter name, a block reading the
residual stream twice) raises ``StageError``; the caller then traces every block.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pipeline.stage import StageError
from stages.lib.export.stamp_clone import clone_node

if TYPE_CHECKING:
    import onnx_ir as ir

__all__ = ["stamp_blocks", "template_blocks"]


def template_blocks(kinds: list[str], taps: list[int]) -> list[int]:
    """The blocks traced: the first of each kind, the tapped ones and the last."""
    first = {k: kinds.index(k) for k in dict.fromkeys(kinds)}
    return sorted({*first.values(), *taps, len(kinds) - 1}) if kinds else []


def _groups(graph: ir.Graph) -> dict[int, list[ir.Node]]:
    from stages.lib.segments.cuts import layer_of

    groups: dict[int, list[ir.Node]] = {}
    for node in graph:  # graph order: topological
        block = layer_of(node, "blocks")
        if block is not None:
            groups.setdefault(block, []).append(node)
    return groups


def _stream(graph: ir.Graph) -> set[ir.Value]:
    """Values computed from the pixels (not through a Shape): the residual stream and its inputs."""
    pixels = next((v for v in graph.inputs if v.name == "pixel_values"), None)
    if pixels is None:
        raise StageError("stamped vision export: the graph has no pixel_values input")
    seen, stack = {pixels}, [pixels]
    while stack:
        for user, _ in stack.pop().uses():
            if user.op_type != "Shape":
                for out in user.outputs:
                    if out not in seen:
                        seen.add(out)
                        stack.append(out)
    return seen


def _computed_from(value: ir.Value, nodes: list[ir.Node]) -> set[ir.Node]:
    members, seen, stack = set(nodes), set(), [value]
    while stack:
        for user, _ in stack.pop().uses():
            if user in members and user not in seen:
                seen.add(user)
                stack.extend(user.outputs)
    return seen


def _outside(nodes: list[ir.Node]) -> list[ir.Value]:
    members = set(nodes)
    return list(dict.fromkeys(v for n in nodes for v in n.inputs if v is not None and v.producer() not in members))


def _residual_out(nodes: list[ir.Node]) -> ir.Value:
    """The block's last value (graph order) that something outside it reads: its residual output."""
    members = set(nodes)
    leaving = [o for n in nodes for o in n.outputs if any(u not in members for u, _ in o.uses())]
    if not leaving:
        raise StageError(f"stamped vision export: block node {nodes[-1].name} feeds nothing outside its block")
    return leaving[-1]


def _weights(nodes: list[ir.Node], block: int) -> list[ir.Value]:
    """The block's own initializers; refuses a float one that carries no parameter name (a
    weight the optimiser derived could not be bound to another block's tensor)."""
    own = f"blocks.{block}."
    found = []
    for v in _outside(nodes):
        tensor = v.const_value if v.is_initializer() else None
        if tensor is None:
            continue
        if own in str(v.name):
            found.append(v)
        elif tensor.dtype.is_floating_point() and tensor.size >= 16:
            raise StageError(f"stamped vision export: initializer {v.name} {list(tensor.shape)} of block {block} "
                             "is no parameter of it")
    return found


def _bound(w: ir.Value, src: int, dst: int, weight: Callable[[str], Any]) -> ir.Value:
    import onnx_ir as ir
    from onnx_ir.tensor_adapters import TorchTensor

    name = str(w.name).replace(f"blocks.{src}.", f"blocks.{dst}.")
    tensor = TorchTensor(weight(name), name=name)
    want = w.const_value
    assert want is not None
    if tensor.dtype != want.dtype or tuple(tensor.shape) != tuple(want.shape):
        raise StageError(f"stamped vision export: {name} is {tensor.dtype} {list(tensor.shape)}, "
                         f"block {src}'s is {want.dtype} {list(want.shape)}")
    return ir.Value(name=name, type=w.type, shape=w.shape.copy() if w.shape is not None else None,
                    const_value=tensor)


def stamp_blocks(model: ir.Model, kinds: list[str], template: list[int], weight: Callable[[str], Any]) -> int:
    """Clone the template's blocks in place into every block of ``kinds``; return how many were stamped.

    ``weight(name)``: the torch tensor of a parameter by its graph name (``visual.blocks.5.attn.qkv.weight``).
    """
    graph = model.graph
    groups = _groups(graph)
    if sorted(groups) != template:
        raise StageError(f"stamped vision export: the template graph has blocks {sorted(groups)}, expected {template}")
    stream = _stream(graph)
    res_in: dict[int, ir.Value] = {}
    res_out = {t: _residual_out(groups[t]) for t in template}
    for k, t in enumerate(template):
        entering = [v for v in _outside(groups[t]) if v in stream]
        want = res_out[template[k - 1]] if k else (entering[0] if len(entering) == 1 else None)
        if want is None or entering != [want]:
            raise StageError(f"stamped vision export: block {t} reads {[str(v.name) for v in entering]} from the "
                             "residual stream, expected one value")
        res_in[t] = want
    exemplar: dict[str, int] = {}
    for t in template:
        exemplar.setdefault(kinds[t], t)  # the first block of each kind
    # what a clone repeats: the exemplar's nodes computed from its residual input; the rest (the
    # rotary unsqueezes the exporter shares between blocks, constants) every clone reads as is
    repeated = {e: [n for n in groups[e] if n in streamed]
                for e in exemplar.values() for streamed in [_computed_from(res_in[e], groups[e])]}
    weights = {e: _weights(nodes, e) for e, nodes in repeated.items()}
    prev, anchor, stamped = res_in[template[0]], groups[template[0]][0], 0
    for i, kind in enumerate(kinds):
        if i in groups:  # a template block: it now reads the block before it, maybe a clone
            for node in groups[i]:
                for j, v in enumerate(node.inputs):
                    if v is res_in[i]:
                        node.replace_input_with(j, prev)
            res_in[i], prev, anchor = prev, res_out[i], groups[i][-1]
            continue
        e = exemplar[kind]
        vmap: dict[ir.Value, ir.Value] = {res_in[e]: prev}
        for w in weights[e]:
            vmap[w] = _bound(w, e, i, weight)
            graph.register_initializer(vmap[w])
        clones = [clone_node(n, vmap, "blocks", e, i, "stamped vision export: node {node} has a subgraph")
                  for n in repeated[e]]
        graph.insert_after(anchor, clones)
        anchor, prev, stamped = clones[-1], vmap[res_out[e]], stamped + 1
    graph.sort()
    return stamped
