"""Rule ``attention``: the exported MatMul→(scale)→(mask Add)→Softmax→MatMul subgraph rewritten
into (a) one ONNX ``Attention`` node (opset ≥ 23) or (b) the canonical pattern TensorRT's fused
MHA kernels match: ``Mul(Q, scale)``→BMM1→[mask Add]→Softmax→BMM2 with nothing else in between.

What the matcher accepts, as torch.onnx.export writes it for the Qwen ViT and decoder:
scale as Mul/Div on Q, on Kᵀ (torchlib puts √scale on both) or on the scores; an additive mask
(causal, window, padding: any tensor); a Cast to float32 around Softmax (eager attention's
``softmax(dtype=float32)`` in an FP16 graph); torchlib's ``Where(IsNaN(p), 0, p)`` guard. K may
come from a KV-cache Concat and be GQA-repeated (Unsqueeze→Expand→Reshape): both stay outside.

Why canonical drops the Cast pair and the NaN guard: anything between BMM1 and BMM2 except the
mask Add and Softmax stops TensorRT's MHA matcher; its kernels keep the softmax in FP32
internally, and the exporter's masks use the dtype's finite minimum, so no row is all −inf.
``Attention`` gets no present-KV outputs: TensorRT does not parse those (NVIDIA/TensorRT#4738),
so the KV-cache Concat stays in the graph in front of the op.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from stages.lib.fusion import annotate

if TYPE_CHECKING:
    import numpy as np
    import onnx_ir as ir

MODES = ("onnx-attention", "canonical")


def _const(value: ir.Value | None) -> np.ndarray | None:
    """The numpy value of an initializer or a Constant node's output, else None."""
    if value is None:
        return None
    if value.const_value is not None:
        return value.const_value.numpy()
    node = value.producer()
    if node is not None and node.op_type == "Constant" and "value" in node.attributes:
        return node.attributes["value"].as_tensor().numpy()
    return None


def _unrepeat(value: ir.Value) -> ir.Value | None:
    """The K/V before a GQA head repeat Unsqueeze(axis 2)→Expand→Reshape, else None.
    ``Attention`` groups query heads over KV heads itself (head h reads KV head h // n_rep,
    the order repeat_kv produces), so the repeat can go."""
    reshape = value.producer()
    if reshape is None or reshape.op_type != "Reshape":
        return None
    expand = reshape.inputs[0].producer() if reshape.inputs[0] is not None else None
    if expand is None or expand.op_type != "Expand":
        return None
    unsq = expand.inputs[0].producer() if expand.inputs[0] is not None else None
    if unsq is None or unsq.op_type != "Unsqueeze" or len(unsq.inputs) < 2:
        return None
    axes = _const(unsq.inputs[1])
    src = unsq.inputs[0]
    if axes is None or axes.size != 1 or src is None or src.shape is None or src.shape.rank() != 4:
        return None
    if int(axes.item()) not in (2, -3):
        return None
    return src


def _make_rule_class() -> Any:
    from onnxscript.rewriter import pattern

    class SdpaToFused(pattern.RewriteRuleClassBase):
        def __init__(self, mode: str):
            super().__init__(name=f"attention_{mode}")
            self.mode = mode
            self._scale = 1.0
            self._key: Any = None  # (a) K in BHSd, built lazily in rewrite
            self._kv_source: tuple[Any, Any] | None = None

        def pattern(self, op, query, key_t, value, mask, q_scale, k_scale, qk_scale, zero):
            def scaled(x, s, tag):
                return pattern.OrValue(
                    [op.Mul(x, s), op.Div(x, s), x], tag_var=tag, tag_values=["Mul", "Div", "None"]
                )

            def cast(x, tag):  # optional Cast (FP16 scores upcast to FP32 for softmax)
                return pattern.OrValue([op.Cast(x), x], tag_var=tag, tag_values=[True, False])

            scores = op.MatMul(scaled(query, q_scale, "q_op"), scaled(key_t, k_scale, "k_op"))
            scores = cast(scaled(cast(scores, "cast_bmm"), qk_scale, "qk_op"), "cast_scale")
            scores = pattern.OrValue([op.Add(scores, mask), scores], tag_var="has_mask",
                                     tag_values=[True, False])
            probs = op.Softmax(cast(scores, "cast_up"), _outputs=["probs"])
            probs = cast(probs, "cast_down")
            probs = pattern.OrValue([op.Where(op.IsNaN(probs), zero, probs), probs],
                                    tag_var="nan_guard", tag_values=[True, False])
            return op.MatMul(probs, value)

        def check(self, context, query, key_t, value, mask, probs, **m) -> Any:  # type: ignore[override]
            res = pattern.MatchResult()
            sm = probs.producer()
            rank = query.shape.rank() if query.shape is not None else None
            axis = sm.attributes["axis"].as_int() if "axis" in sm.attributes else -1
            if rank is None or axis not in (-1, rank - 1):
                return res.fail("Softmax is not over the last axis (or Q rank unknown)")
            scale = 1.0
            for tag, name in (("q_op", "q_scale"), ("k_op", "k_scale"), ("qk_op", "qk_scale")):
                if m.get(tag, "None") == "None":
                    continue
                c = _const(m.get(name))
                if c is None or c.size != 1 or float(c.item()) == 0.0:
                    return res.fail(f"{name} is not a constant scalar")
                scale *= float(c.item()) if m[tag] == "Mul" else 1.0 / float(c.item())
            if not math.isfinite(scale):
                return res.fail("scale is not finite")
            if query.dtype is None or key_t.dtype != query.dtype or value.dtype != query.dtype:
                return res.fail("Q, K, V dtypes unknown or different")
            ups = sum(bool(m.get(t)) for t in ("cast_bmm", "cast_scale", "cast_up"))
            if ups > 1 or bool(m.get("cast_down")) != bool(ups):
                return res.fail("Casts around the softmax are not one up/down pair")
            self._scale = scale
            if self.mode == "canonical":
                extra = ("k_op", "qk_op", "cast_bmm", "cast_scale", "cast_up", "cast_down", "nan_guard")
                if m.get("q_op", "None") != "Div" and not any(m.get(t) not in (None, False, "None") for t in extra):
                    return res.fail("already canonical")  # else the rule would re-match its own output
                return res
            if rank != 4 or value.shape is None or value.shape.rank() != 4:
                return res.fail("ONNX Attention here needs 4-D Q/K/V (B, H, S, D)")
            return res

        def rewrite(self, op, query, key_t, value, mask, has_mask=False, **_):
            import numpy as np
            from onnx_ir import tensor

            dt = query.dtype
            if self.mode == "canonical":
                q = query
                if not math.isclose(self._scale, 1.0, rel_tol=0, abs_tol=0):
                    s = tensor(np.array(self._scale, dtype=dt.numpy()))
                    q = op.Mul(query, op.Constant(value=s))
                scores = op.MatMul(q, key_t)
                if has_mask:
                    scores = op.Add(scores, _mask_as(op, mask, dt))
                return op.MatMul(op.Softmax(scores, axis=-1), value)
            key = _key_bhsd(op, key_t)
            val = value
            k_src, v_src = _unrepeat(key), _unrepeat(value)
            if k_src is not None and v_src is not None:  # native GQA: drop the repeat
                key, val = k_src, v_src
            args = [query, key, val]
            if has_mask:
                args.append(_mask_as(op, mask, dt))
            # No softmax_precision even where the export had an FP32 softmax: TensorRT's parser
            # rejects the attribute ("not supported in TensorRT Attention", measured with
            # TensorRT-RTX 1.7) and its MHA kernels keep the softmax in FP32 anyway.
            return op.Attention(*args, scale=float(self._scale))

    return SdpaToFused


def _mask_as(op: Any, mask: ir.Value, dt: Any) -> Any:
    """The additive mask in the scores' dtype. An FP32 mask (the exporter adds it after the
    upcast) holds float32's minimum, which is −inf in FP16: a fully masked row would then turn
    into NaN and spread through the next BMM2, so it is clipped into FP16's range first."""
    import numpy as np
    from onnx_ir import DataType, tensor

    if mask.dtype == dt or mask.dtype == DataType.BOOL or mask.dtype is None:
        return mask
    info = np.finfo(dt.numpy())
    lo, hi = (op.Constant(value=tensor(np.array(v, dtype=mask.dtype.numpy()))) for v in (info.min, info.max))
    return op.Cast(op.Clip(mask, lo, hi), to=dt)


def _key_bhsd(op: Any, key_t: ir.Value) -> Any:
    """K (B, H, S_kv, D) from the Kᵀ the exporter fed BMM1: reuse the untransposed value when
    the producer is a plain last-two-axes transpose (direct, or torchlib's Reshape→3-D
    Transpose→Reshape); otherwise transpose back (cleanup collapses Transpose pairs)."""
    node = key_t.producer()
    if node is not None and node.op_type == "Transpose":
        perm = list(node.attributes["perm"].as_ints()) if "perm" in node.attributes else []
        if perm == [0, 1, 3, 2]:
            return node.inputs[0]
    if node is not None and node.op_type == "Reshape":
        tr = node.inputs[0].producer() if node.inputs[0] is not None else None
        if tr is not None and tr.op_type == "Transpose" and list(tr.attributes["perm"].as_ints()) == [0, 2, 1]:
            rs = tr.inputs[0].producer() if tr.inputs[0] is not None else None
            src = rs.inputs[0] if rs is not None and rs.op_type == "Reshape" else None
            if src is not None and src.shape is not None and src.shape.rank() == 4:
                return src
    return op.Transpose(key_t, perm=[0, 1, 3, 2])


def fuse_attention(model: ir.Model, mode: str) -> int:
    """Rewrite every matched attention block; returns how many were rewritten."""
    from onnxscript.rewriter import RewriteRuleSet

    if mode not in MODES:
        raise ValueError(f"attention mode {mode!r} not in {MODES}")
    if mode == "onnx-attention" and model.opset_imports.get("", 0) < 23:
        raise ValueError("ONNX Attention needs opset >= 23 (export.opset)")
    rule = _make_rule_class().rule(mode)
    return int(RewriteRuleSet([rule]).apply_to_model(model))


def annotate_mha(model: ir.Model, start: int = 0) -> tuple[int, int]:
    """Tag canonical MHA chains and Attention nodes; returns (tagged groups, Softmax nodes
    left outside any group): the second figure is attention the rules did not fuse."""
    count, loose = start, 0
    for node in list(model.graph):
        if node.op_type == "Attention":
            annotate.tag(node, f"mha/{count:04d}", "mha", "attention")
            count += 1
            continue
        if node.op_type != "Softmax":
            continue
        chain = _canonical_chain(node)
        if chain is None:
            loose += 1
            continue
        for n, role in chain:
            annotate.tag(n, f"mha/{count:04d}", "mha", role)
        count += 1
    return count - start, loose


def _canonical_chain(softmax: ir.Node) -> list[tuple[ir.Node, str]] | None:
    users = [n for n, _ in softmax.outputs[0].uses()]
    if len(users) != 1 or users[0].op_type != "MatMul" or users[0].inputs[0] is not softmax.outputs[0]:
        return None
    chain = [(softmax, "softmax"), (users[0], "bmm2")]
    prev = softmax.inputs[0].producer() if softmax.inputs[0] is not None else None
    if prev is not None and prev.op_type == "Add":
        chain.append((prev, "mask_add"))
        prev = prev.inputs[0].producer() if prev.inputs[0] is not None else None
    if prev is None or prev.op_type != "MatMul":
        return None
    chain.append((prev, "bmm1"))
    q = prev.inputs[0].producer() if prev.inputs[0] is not None else None
    if q is not None and q.op_type == "Mul" and _const(q.inputs[1]) is not None:
        chain.append((q, "q_scale"))
    return chain
