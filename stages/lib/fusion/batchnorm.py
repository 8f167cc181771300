"""Rule ``fold_batchnorm``: BatchNormalization folded into the Conv before it, and the
Conv→[BN]→[residual Add]→[activation→[MaxPool]] chains tagged as one fusible partition.

Folding uses onnxscript's own rewrite rule (W' = W·γ/σ, b' = (b − μ)·γ/σ + β, checked that the
weights are constant initializers not shared with other nodes): a BN left in place is a separate
scale layer in TensorRT and a place where the Q/DQ stage could cut the conv from its epilogue.

The partition tags (see ``annotate``) tell the Q/DQ stage which edges TensorRT fuses itself:
TensorRT folds a following activation (and a residual Add on the conv output) into the conv's
epilogue and a MaxPool into the same partition only when no Q/DQ sits between them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from stages.lib.fusion import annotate

if TYPE_CHECKING:
    import onnx_ir as ir

# Activations TensorRT's conv kernels run as a fused epilogue.
FUSIBLE_ACTIVATIONS = frozenset(
    {"Relu", "Clip", "LeakyRelu", "Sigmoid", "Tanh", "HardSigmoid", "Elu", "Selu", "Softplus"}
)


def fold_batchnorm(model: ir.Model) -> int:
    """Fold every foldable BN into its Conv/ConvTranspose; returns how many were folded."""
    from onnxscript.rewriter import RewriteRuleSet
    from onnxscript.rewriter.rules.common import (
        fuse_batchnorm_into_conv_rule,
        fuse_batchnorm_into_conv_transpose_rule,
    )

    rules = RewriteRuleSet([fuse_batchnorm_into_conv_rule, fuse_batchnorm_into_conv_transpose_rule])
    return int(rules.apply_to_model(model))


def _sole_consumer(value: ir.Value, graph_outputs: set[ir.Value]) -> ir.Node | None:
    """The one node reading ``value``, or None when it fans out or is a graph output
    (a fanned-out or exported intermediate cannot be fused into an epilogue)."""
    if value in graph_outputs:
        return None
    users = {node for node, _ in value.uses()}
    return users.pop() if len(users) == 1 else None


def _conv_branch(v: ir.Value | None) -> bool:
    """v is a Conv (or Conv→BN) output read only once: a branch TensorRT can fuse into an Add."""
    if v is None or len({n for n, _ in v.uses()}) != 1:
        return False
    p = v.producer()
    if p is not None and p.op_type == "BatchNormalization":
        p = p.inputs[0].producer() if p.inputs[0] is not None else None
    return p is not None and p.op_type == "Conv"


def _owns_add(add: ir.Node, ours: ir.Value) -> bool:
    """A projection-shortcut Add has a conv on both inputs; the one on input 0 takes the Add
    (the same choice the Q/DQ stage makes: input 1 is then the skip it quantizes)."""
    if add.inputs[0] is ours:
        return True
    return not _conv_branch(add.inputs[0])


def annotate_conv_partitions(model: ir.Model, start: int = 0) -> int:
    """Tag Conv→[BN]→[Add]→act→[MaxPool] chains (at least Conv→act or Conv→Add); returns how many."""
    graph = model.graph
    outputs = set(graph.outputs)
    count = start
    for conv in list(graph):
        if conv.op_type != "Conv" or conv.domain not in ("", "ai.onnx"):
            continue
        chain: list[tuple[ir.Node, str]] = [(conv, "conv")]
        nxt = _sole_consumer(conv.outputs[0], outputs)
        if nxt is not None and nxt.op_type == "BatchNormalization":
            chain.append((nxt, "bn"))
            nxt = _sole_consumer(nxt.outputs[0], outputs)
        if nxt is not None and nxt.op_type == "Add":
            if not _owns_add(nxt, chain[-1][0].outputs[0]):
                continue  # the other branch's conv fuses this Add; ours ends without an activation
            chain.append((nxt, "residual_add"))
            nxt = _sole_consumer(nxt.outputs[0], outputs)
        if nxt is not None and nxt.op_type in FUSIBLE_ACTIVATIONS:
            chain.append((nxt, "act"))
            pool = _sole_consumer(nxt.outputs[0], outputs)
            if pool is not None and pool.op_type == "MaxPool":
                chain.append((pool, "pool"))
        elif chain[-1][1] != "residual_add":
            continue  # no epilogue to fuse: nothing TensorRT would keep together for us
        # (Conv→[BN]→Add alone is a partition: TensorRT merges an elementwise sum into the conv)
        group = f"conv_act/{count:04d}"
        for node, role in chain:
            annotate.tag(node, group, "conv_act", role)
        count += 1
    return count - start
