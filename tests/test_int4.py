"""INT4 weight-only: packed INT4 behind DequantizeLinear(axis, block_size), opset 21, AWQ-clip."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from stages.lib.parity.metrics import compare
from stages.lib.qdq import calibrators as C
from stages.lib.qdq.graphio import check, run, session, to_proto
from stages.lib.qdq.int4 import block_for, quantize_blocks
from stages.lib.qdq.recipe import Calib, Recipe, build
from tests import qdq_graphs as G


def _feed(proto, seed):
    f = G.random_feed(proto, seed)
    f["x"][..., :8] *= 20  # a few outlier channels, as LLM activations have
    return f


def _calib(proto):
    col, sess = C.make_collector(ir.from_proto(proto))
    for s in range(4):
        col.update(run(sess, _feed(proto, s), col.names))
    return Calib.from_ranges({"tensors": col.ranges("max"), "order": col.names}, col.arrays())


@pytest.mark.parametrize("dt", [np.float32, np.float16])
def test_int4_graph_valid_packed_and_close(dt):
    proto = onnx.shape_inference.infer_shapes(G.mlp_block(d=128, dt=dt))
    built = build(proto, Recipe("int4-weight", int4_block=64), _calib(proto))
    check(built.model)
    q = to_proto(built.model)
    assert q.opset_import[0].version == 21 and q.ir_version >= 10
    w = next(i for i in q.graph.initializer if i.name == "w_up_int4")
    assert w.data_type == onnx.TensorProto.INT4 and len(w.raw_data) == 128 * 256 // 2  # two per byte
    dq = next(n for n in q.graph.node if n.input[0] == "w_up_int4")
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in dq.attribute}
    assert attrs == {"axis": 0, "block_size": 64} and len(dq.input) == 2  # symmetric: no zero point
    assert not any(n.op_type == "QuantizeLinear" for n in q.graph.node)  # weight-only
    feed = _feed(proto, 77)
    ref, out = run(session(proto), feed), run(session(q), feed)
    assert compare(out["y"], ref["y"]).cosine > 0.98


def test_awq_clip_beats_plain_max_on_outlier_channels():
    proto = onnx.shape_inference.infer_shapes(G.mlp_block(d=128))
    calib = _calib(proto)
    feed = _feed(proto, 99)
    ref = run(session(proto), feed)["y"]
    cos = {}
    for awq in (False, True):
        built = build(proto, Recipe("int4-weight", awq=awq), calib)
        cos[awq] = compare(run(session(built.model), feed)["y"], ref).cosine
    assert cos[True] > cos[False]


def test_quantize_blocks_weighted_error_not_worse():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((128, 32)).astype(np.float32)
    ms = np.ones(128, np.float32)
    ms[:4] = 400.0
    codes, scales, gain = quantize_blocks(w, 64, ms, np.float32)
    assert scales.shape == (2, 32) and codes.shape == (128, 32) and gain >= 0.0
    assert block_for(192, 128) == 64 and block_for(48, 128) is None


def test_lm_head_excluded_by_default():
    from onnx import helper

    proto = onnx.shape_inference.infer_shapes(G.mlp_block(d=128))
    up = next(n for n in proto.graph.node if n.name == "mlp/up/MatMul")
    up.name = "model/lm_head/MatMul"
    built = build(proto, Recipe("int4-weight"), _calib(proto))
    assert [k["node"] for k in built.placement.kept] == ["model/lm_head/MatMul"]
    assert "lm_head" in built.placement.kept[0]["why"] and built.stats["weight_dq"] == 1
    # a head producing `logits` is kept even without the name
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["logits"], name="proj")], "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 32, 64])],
        [helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, [1, 32, 256])],
        [onnx.numpy_helper.from_array(np.ones((64, 256), np.float32), "w")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 19)])
    b = build(m, Recipe("int4-weight"), Calib())
    assert b.stats["weight_dq"] == 0 and b.placement.kept[0]["node"] == "proj"


def _rms_qkv(d: int = 128, seq: int = 32):
    """x → RMSNorm (Mul by gamma) → q/k/v projections, with a few large input channels."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(3)
    from tests.qdq_graphs import rms_norm

    inits, nodes = rms_norm(np.ones(d), np.float32)
    outs = []
    for p in "qkv":
        inits.append(numpy_helper.from_array((rng.standard_normal((d, d)) * 0.1).astype(np.float32), f"w{p}"))
        nodes.append(helper.make_node("MatMul", ["h", f"w{p}"], [p], name=f"attn/{p}_proj/MatMul"))
        outs.append(helper.make_tensor_value_info(p, TensorProto.FLOAT, [1, seq, d]))
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, seq, d])], outs, inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 19)])
    m.ir_version = 10
    return onnx.shape_inference.infer_shapes(m)


def test_awq_scales_fold_into_gamma_exactly_and_help():
    from stages.lib.qdq import awq
    from stages.lib.qdq.placement import plan

    proto = _rms_qkv()
    calib = _calib(proto)
    assert "h" in calib.chan_ms
    m = ir.from_proto(proto)
    pl = plan(m.graph, "int4-weight", calib.shapes)
    ms, st = awq.apply(m, pl, calib.chan_ms, 64)
    g = st.groups["h"]
    assert g["alpha"] > 0 and g["gain"] > 0 and len(g["consumers"]) == 3
    assert not np.allclose(ms["h"], calib.chan_ms["h"])  # the clip search sees E[(x/s)^2]
    feed = _feed(proto, 11)
    ref, out = run(session(proto), feed), run(session(m), feed)  # float graph: scaling is exact
    for k in "qkv":
        np.testing.assert_allclose(out[k], ref[k], rtol=1e-4, atol=1e-4)
    built = build(proto, Recipe("int4-weight", int4_block=64, awq=True), calib)
    plain = build(proto, Recipe("int4-weight", int4_block=64, awq=False), calib)
    check(built.model)
    cos = {n: min(compare(run(session(b.model), feed)[k], ref[k]).cosine for k in "qkv")
           for n, b in (("awq", built), ("plain", plain))}
    assert built.stats["awq_scales"]["h"]["alpha"] > 0 and cos["awq"] > cos["plain"]
