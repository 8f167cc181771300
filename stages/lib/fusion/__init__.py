"""Graph fusion rules for the ``fuse`` stage: one named rule per module.

``apply_rules`` runs them in order (cleanup → fold_batchnorm → legacy_softmax → attention → cleanup →
annotate) on an ``onnx_ir.Model`` in place and returns per-rule figures for ``fuse.json``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import onnx_ir as ir


def resolve_attention_mode(setting: str, opset: int) -> str | None:
    """``fuse.attention`` → the mode to run (None: off). ``auto`` picks the ONNX ``Attention`` op
    from opset 23 (TensorRT parses it from 10.14, and TensorRT-RTX 1.7 fuses it into one MHA
    kernel), the canonical BMM pattern below that."""
    if setting == "off":
        return None
    if setting == "auto":
        return "onnx-attention" if opset >= 23 else "canonical"
    if setting == "onnx-attention" and opset < 23:
        raise ValueError(f"fuse.attention: onnx-attention needs export.opset >= 23 (got {opset})")
    return setting


def node_count(model: ir.Model) -> int:
    return sum(1 for _ in model.graph.all_nodes())


def op_histogram(model: ir.Model) -> dict[str, int]:
    hist: dict[str, int] = {}
    for n in model.graph.all_nodes():
        hist[n.op_type] = hist.get(n.op_type, 0) + 1
    return dict(sorted(hist.items()))


def apply_rules(
    model: ir.Model, *, attention: str | None, fold_batchnorm: bool, cleanup: bool
) -> dict[str, Any]:
    """Run the rules in place; returns {"rules": {name: {matches, nodes_before, nodes_after}},
    (cleanup's "matches" is the number of nodes it removed)
    "mha_groups", "unfused_softmax", "conv_act_groups", "groups"}."""
    from stages.lib.fusion import annotate
    from stages.lib.fusion.attention import annotate_mha, fuse_attention
    from stages.lib.fusion.batchnorm import annotate_conv_partitions
    from stages.lib.fusion.batchnorm import fold_batchnorm as fold_bn
    from stages.lib.fusion.cleanup import cleanup as run_cleanup
    from stages.lib.fusion.softmax import fold_legacy_softmax

    rules: dict[str, Any] = {}

    def step(name: str, fn: Any) -> None:
        before = node_count(model)
        matches = fn()
        rules[name] = {"matches": before - node_count(model) if matches is None else matches, "nodes_before": before, "nodes_after": node_count(model)}

    annotate.clear(model)
    def clean() -> None:
        run_cleanup(model)

    if cleanup:  # first: folds the constants the other rules' checks read (scales, BN params)
        step("cleanup", clean)
    if fold_batchnorm:
        step("fold_batchnorm", lambda: fold_bn(model))
    if attention is not None:  # an upgraded opset-12 Softmax hides the attention pattern
        step("legacy_softmax", lambda: fold_legacy_softmax(model))
        step(f"attention[{attention}]", lambda: fuse_attention(model, attention))
    if cleanup:  # again: drops what the rewrites left dead, collapses inserted Transposes
        step("cleanup_post", clean)
    else:
        import onnx_ir.passes.common as common

        common.RemoveUnusedNodesPass()(model)
        common.NameFixPass()(model)  # rewritten nodes need names for the group table
    conv_groups = annotate_conv_partitions(model)
    mha_groups, loose = annotate_mha(model)
    return {
        "rules": rules,
        "conv_act_groups": conv_groups,
        "mha_groups": mha_groups,
        "unfused_softmax": loose,
        "groups": annotate.groups_of(model),
    }
