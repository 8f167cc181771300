"""Rule ``cleanup``: constant folding, dead nodes, shape chains, no-op and Transpose/Reshape
pairs. Nothing here is hand-written: it is onnxscript's optimizer pass list (constant folding
with node-level shape inference, which also folds Shape→Gather→Concat chains whose dims are
static, plus its default rewrite rules), run through onnx-ir's pass manager so that the BN
folding rule can be left out when ``fuse.fold_batchnorm`` is off.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import onnx_ir as ir


def _default_rules(fold_batchnorm: bool) -> list:
    import onnxscript.rewriter as rw
    from onnxscript.rewriter.rules.common import _fuse_batchnorm

    # The optimizer's default rule list is module-private; taking it keeps us in step with
    # onnxscript instead of copying the list. BN folding is its own, counted rule (batchnorm.py).
    bn = set(_fuse_batchnorm.rules.rules)
    # SlicesSplit (rotate_half's two Slices -> one Split) is a two-output pattern, which
    # onnxscript matches by trying node pairs: 7.7 s of the 9.3 s of one rewrite pass over a
    # 32-block ViT (3,700 nodes), and it rewrote nothing in the Qwen-VL exports (their second
    # Slice ends at INT64_MAX, not at the last dim the rule asks for). Left out.
    from onnxscript.rewriter.rules.common._basic_rules import slice_split_rule

    return [r for r in rw._DEFAULT_REWRITE_RULES if (fold_batchnorm or r not in bn) and r is not slice_split_rule]


def cleanup(model: ir.Model, *, fold_batchnorm: bool = False, iterations: int = 2) -> None:
    """Optimize ``model`` in place (the same passes as ``onnxscript.optimizer.optimize_ir``)."""
    import onnx_ir as ir
    import onnx_ir.passes.common as common
    from onnxscript.optimizer import _constant_folding
    from onnxscript.rewriter import RewritePass

    loop = ir.passes.PassManager(
        [
            _constant_folding.FoldConstantsPass(
                shape_inference=True,
                input_size_limit=_constant_folding.DEFAULT_CONSTANT_FOLD_INPUT_SIZE_LIMIT,
                output_size_limit=_constant_folding.DEFAULT_CONSTANT_FOLD_OUTPUT_SIZE_LIMIT,
            ),
            RewritePass(_default_rules(fold_batchnorm)),
            common.RemoveUnusedNodesPass(),
            common.RemoveUnusedFunctionsPass(),
            common.RemoveUnusedOpsetsPass(),
        ],
        steps=iterations,
        early_stop=True,
    )
    ir.passes.Sequential(
        common.InlinePass(),
        loop,
        common.IdentityEliminationPass(),
        common.RemoveUnusedNodesPass(),
        common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        common.DeduplicateInitializersPass(),
        common.CommonSubexpressionEliminationPass(),
        common.OutputFixPass(),
        common.NameFixPass(),
    )(model)
