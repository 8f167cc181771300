"""Q/DQ insertion: valid ONNX, ORT-runnable with optimizations off, symmetric, dtype-matched."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from stages.lib.parity.metrics import compare
from stages.lib.qdq import calibrators as C
from stages.lib.qdq.graphio import check, run, session, to_proto
from stages.lib.qdq.recipe import Calib, Recipe, build
from tests import qdq_graphs as G


def _calib(proto, n=4):
    m = ir.from_proto(proto)
    col, sess = C.make_collector(m)
    for s in range(n):
        col.update(run(sess, G.random_feed(proto, s), col.names))
    return Calib.from_ranges({"tensors": col.ranges("max"), "order": col.names}, col.arrays())


CASES = {
    "conv": G.conv_bn_relu_pool,
    "conv16": lambda: G.conv_bn_relu_pool(np.float16),
    "mlp16": lambda: G.mlp_block(dt=np.float16),
    "mha": G.mha_block,
    "concat": G.concat_convs,
    "deconv_gemm": G.conv_transpose_gemm,
}


@pytest.mark.parametrize("mode", ["int8", "fp8"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_insert_valid_and_close(case, mode):
    proto = onnx.shape_inference.infer_shapes(CASES[case]())
    built = build(proto, Recipe(mode), _calib(proto))
    check(built.model)
    q = to_proto(built.model)
    assert q.opset_import[0].version >= (19 if mode == "fp8" else 13)
    feed = G.random_feed(proto, 123)  # held out: not a calibration seed
    ref, out = run(session(proto), feed), run(session(q), feed)
    for k in ref:
        assert compare(out[k], ref[k]).cosine > 0.99, (case, mode, k)
    want = {"int8": onnx.TensorProto.INT8, "fp8": onnx.TensorProto.FLOAT8E4M3FN}[mode]
    inits = {i.name: i for i in q.graph.initializer}
    fdt = proto.graph.input[0].type.tensor_type.elem_type
    nq = 0
    for n in q.graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            zp = onnx.numpy_helper.to_array(inits[n.input[2]])
            assert inits[n.input[2]].data_type == want and not np.any(zp.astype(np.float32))  # symmetric
            assert inits[n.input[1]].data_type == fdt  # scales in the graph's float dtype
            nq += n.op_type == "QuantizeLinear"
    assert nq == built.stats["qdq_pairs"] > 0


def test_weights_stored_quantized_per_channel():
    proto = onnx.shape_inference.infer_shapes(G.conv_bn_relu_pool())
    built = build(proto, Recipe("int8"), _calib(proto))
    q = to_proto(built.model)
    names = {i.name for i in q.graph.initializer}
    assert "w1" not in names and "w1_quantized" in names  # original float weight dropped
    dq = next(n for n in q.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == "w1_quantized")
    assert onnx.helper.get_attribute_value(dq.attribute[0]) == 0
    scale = next(i for i in q.graph.initializer if i.name == dq.input[1])
    assert list(scale.dims) == [8]


def test_concat_group_scales_equal():
    proto = onnx.shape_inference.infer_shapes(G.concat_convs())
    calib = _calib(proto)
    calib.amax["x1"], calib.amax["x2"], calib.amax["cat"] = 1.0, 3.0, 3.0
    q = to_proto(build(proto, Recipe("int8"), calib).model)
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in q.graph.initializer}
    scales = {n.input[0]: float(inits[n.input[1]]) for n in q.graph.node if n.op_type == "QuantizeLinear"}
    assert scales["x1"] == scales["x2"] == scales["cat"] == pytest.approx(3.0 / 127)


def test_missing_range_is_named():
    from stages.lib.qdq.insert import MissingRange

    proto = onnx.shape_inference.infer_shapes(G.mlp_block())
    with pytest.raises(MissingRange, match="'h'"):
        build(proto, Recipe("int8"), Calib(amax={"g": 1.0}))


def test_fp8_mha_insertion_runs_fp16():
    proto = G.fused(G.mha_block(dt=np.float16, casts=True))
    built = build(proto, Recipe("fp8", attention="fp8-mha"), _calib(proto))
    check(built.model)
    assert built.stats["qdq_pairs"] == 6  # x, o-proj input, q, k, probabilities, v
    q = to_proto(built.model)
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in q.graph.initializer}
    softmax = next(n for n in proto.graph.node if n.op_type == "Softmax").output[0]
    sm = next(n for n in q.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == softmax)
    assert float(inits[sm.input[1]]) == pytest.approx(1 / 448, rel=1e-3)  # fixed softmax scale
    feed = G.random_feed(proto, 7)
    ref, out = run(session(proto), feed), run(session(q), feed)
    assert compare(out["y"], ref["y"]).cosine > 0.98


def test_storage_codes_round_half_even_and_clip_to_the_type():
    """The codes' dtype and range come from ``dtypes.QTYPES`` (ml_dtypes' limits), for every mode."""
    from stages.lib.qdq.insert import quantize_array, zero_point

    w, one = np.array([2.5, -2.5, 126.6, 1000.0, -1000.0, 7.4, -9.0], np.float32), np.ones(1, np.float32)
    assert quantize_array(w, one, "int8").tolist() == [2, -2, 127, 127, -128, 7, -9]
    assert quantize_array(w, one, "int4").astype(np.int8).tolist() == [2, -2, 7, 7, -8, 7, -8]
    fp8 = quantize_array(w, one, "float8e4m3fn")
    assert str(fp8.dtype) == "float8_e4m3fn" and fp8.astype(np.float32)[3:5].tolist() == [448.0, -448.0]
    assert {q: str(zero_point(q, (2,)).dtype) for q in ("int8", "int4", "float8e4m3fn")} == {
        "int8": "int8", "int4": "int4", "float8e4m3fn": "float8_e4m3fn"}
    with pytest.raises(ValueError, match="unknown storage type"):
        quantize_array(w, one, "uint8")
