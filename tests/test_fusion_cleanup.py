"""Cleanup on exporter leftovers: constant subgraphs, shape chains, dead nodes, Identity."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from stages.lib.fusion import op_histogram
from stages.lib.fusion.check import compare, random_feeds
from stages.lib.fusion.cleanup import cleanup


def _leftovers() -> onnx.ModelProto:
    """x[B=2,S,8] → Reshape to a shape computed from Shape(x) (static dims) ... as exporters do."""
    init = [
        onnx.numpy_helper.from_array(np.arange(8, dtype=np.float32), "a"),
        onnx.numpy_helper.from_array(np.array(2.0, np.float32), "two"),
        onnx.numpy_helper.from_array(np.array([0], np.int64), "i0"),
        onnx.numpy_helper.from_array(np.array([-1], np.int64), "m1"),
        onnx.numpy_helper.from_array(np.random.default_rng(0).standard_normal((8, 8)).astype(np.float32), "w"),
    ]
    nodes = [
        helper.make_node("Mul", ["a", "two"], ["a2"], name="const_mul"),  # constant subgraph
        helper.make_node("Add", ["x", "a2"], ["xa"], name="add"),
        helper.make_node("Shape", ["xa"], ["shp"], name="shape"),
        helper.make_node("Gather", ["shp", "i0"], ["b"], name="gather", axis=0),  # static dim 2
        helper.make_node("Concat", ["b", "m1"], ["newshape"], name="concat", axis=0),
        helper.make_node("Reshape", ["xa", "newshape"], ["flat"], name="reshape"),
        helper.make_node("Identity", ["flat"], ["flat_id"], name="identity"),
        helper.make_node("MatMul", ["x", "w"], ["dead"], name="dead_matmul"),  # unused
        helper.make_node("Relu", ["flat_id"], ["y"], name="relu"),
    ]
    g = helper.make_graph(nodes, "leftovers", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 24])], init)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 19)])
    m.ir_version = 10
    return m


def test_cleanup_folds_and_prunes_with_equal_outputs() -> None:
    import onnx_ir as ir

    m = _leftovers()
    mi = ir.from_proto(m)
    cleanup(mi)
    hist = op_histogram(mi)
    assert hist == {"Add": 1, "Relu": 1, "Reshape": 1}, hist  # Mul, shape chain, Identity, dead gone
    out = ir.to_proto(mi)
    onnx.checker.check_model(out)
    cmp = compare(m, out, random_feeds(m))
    assert cmp["max_abs"] <= 1e-5


def test_cleanup_keeps_dynamic_shape_chains() -> None:
    import onnx_ir as ir

    m = _leftovers()
    m.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "batch"  # dim 0 now symbolic
    mi = ir.from_proto(m)
    cleanup(mi)
    assert "Shape" in op_histogram(mi)  # Shape(x)[0] cannot be folded for a dynamic batch
    cmp = compare(m, ir.to_proto(mi), random_feeds(m, {"batch": 3}))
    assert cmp["max_abs"] <= 1e-5
