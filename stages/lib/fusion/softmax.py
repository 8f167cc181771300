"""Rule ``legacy_softmax``: ``Flatten(x, axis=r-1)→Softmax→Reshape(·, Shape(x))`` back to one
``Softmax(x, axis=-1)``.

The Flatten may already be the ``Reshape(x, [rows, last])`` constant folding made of it.

Why: before opset 13 Softmax normalised over the flattened trailing axes; the ONNX version
converter keeps that meaning when it upgrades a graph (an opset-12 model from Paddle2ONNX, as
the PP-OCR recognizer ships) by wrapping every Softmax in that Flatten/Reshape pair. When the
flattened axis is the last one, the pair is a no-op, but it sits between BMM1 and BMM2 and stops
TensorRT's MHA matcher (measured with TensorRT-RTX 1.7 on the PP-OCRv4 recognizer: 0 fused MHA
with the pair, 2 of 2 without it). onnxscript's default rules have no such rule.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import onnx_ir as ir


def _make_rule() -> Any:
    from onnxscript.rewriter import pattern

    class LegacySoftmax(pattern.RewriteRuleClassBase):
        def pattern(self, op, x, shape, flat_shape):
            # constant folding turns a static Flatten into Reshape(x, [rows, last])
            flat = pattern.OrValue([op.Flatten(x, _outputs=["flat"]), op.Reshape(x, flat_shape, _outputs=["flat"])])
            return op.Reshape(op.Softmax(flat, _outputs=["probs"]), shape)

        def check(self, context, x, flat, probs, shape, flat_shape=None, **_) -> Any:  # type: ignore[override]
            res = pattern.MatchResult()
            rank = x.shape.rank() if x.shape is not None else None
            if rank is None or rank < 2:
                return res.fail("rank of the Softmax input unknown")
            if not _is_shape_of(shape, x):
                return res.fail("the Reshape does not restore the Softmax input's shape")
            s_axis = probs.producer().attributes.get_int("axis", -1)
            if flat.producer().op_type == "Flatten":
                if flat.producer().attributes.get_int("axis", 1) % rank != rank - 1:
                    return res.fail("Flatten does not split off the last axis alone")
            else:
                last = x.shape[rank - 1]
                dims = flat_shape.const_value.numpy().ravel().tolist() if flat_shape.const_value is not None else []
                if not isinstance(last, int) or len(dims) != 2 or int(dims[1]) != last:
                    return res.fail("the Reshape does not keep the last axis alone")
            if s_axis not in (-1, 1):
                return res.fail("Softmax is not over the flattened last axis")
            return res

        def rewrite(self, op, x, **_):
            return op.Softmax(x, axis=-1)

    return LegacySoftmax.rule()


def _is_shape_of(shape: ir.Value, x: ir.Value) -> bool:
    """``shape`` is ``Shape(x)`` (whole), or the constant it folded to where x's dims are static."""
    node = shape.producer()
    if node is not None and node.op_type == "Shape" and node.inputs[0] is x:
        return "start" not in node.attributes and "end" not in node.attributes
    value = shape.const_value
    dims = [d for d in x.shape] if x.shape is not None else []
    if value is None or not dims or not all(isinstance(d, int) for d in dims):
        return False
    return [int(v) for v in value.numpy().ravel()] == dims


def fold_legacy_softmax(model: ir.Model) -> int:
    """Rewrite every matched Flatten/Softmax/Reshape triple; returns how many."""
    from onnxscript.rewriter import RewriteRuleSet

    return int(RewriteRuleSet([_make_rule()]).apply_to_model(model))
