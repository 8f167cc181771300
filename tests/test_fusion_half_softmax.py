"""Two rules a trained bring-your-own graph needs before TensorRT fuses it: the legacy (opset < 13)
Softmax the ONNX version converter leaves behind, and the FP16 conversion of an FP32 graph."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh


def _attention(path: Path, flatten_axis: int | None, opset: int = 19) -> Path:
    """x (1, 8, 16) → packed QKV projection → heads (1, 2, 8, 4) → Mul(scale) on Q → Q·Kᵀ →
    softmax → ·V, as Paddle2ONNX writes it. ``flatten_axis``: the softmax as the ONNX version
    converter leaves an opset-12 Softmax(axis) it cannot prove is over the last axis
    (Shape → Flatten(axis) → Softmax(axis=1) → Reshape(Shape)); None: one Softmax(axis=-1)."""
    rng = np.random.default_rng(0)
    inits = [nh.from_array(rng.standard_normal((16, 24)).astype(np.float32) * 0.3, "w_qkv"),
             nh.from_array(np.array([1, 8, 3, 2, 4], np.int64), "qkv_shape"),
             nh.from_array(np.array(0.5, np.float32), "scale"), nh.from_array(np.array([0], np.int64), "axis0")]
    if flatten_axis is None:
        soft = [h.make_node("Softmax", ["scores"], ["probs"], axis=-1)]
    else:
        soft = [h.make_node("Shape", ["scores"], ["scores_shape"]),
                h.make_node("Flatten", ["scores"], ["flat"], axis=flatten_axis),
                h.make_node("Softmax", ["flat"], ["flat_probs"], axis=1),
                h.make_node("Reshape", ["flat_probs", "scores_shape"], ["probs"])]
    nodes = [h.make_node("MatMul", ["x", "w_qkv"], ["qkv"]),
             h.make_node("Reshape", ["qkv", "qkv_shape"], ["qkv5"]),
             h.make_node("Transpose", ["qkv5"], ["qkv_t"], perm=[2, 0, 3, 1, 4]),
             h.make_node("Split", ["qkv_t"], ["q5", "k5", "v5"], axis=0, num_outputs=3),
             *(h.make_node("Squeeze", [f"{t}5", "axis0"], [t]) for t in "qkv"),
             h.make_node("Mul", ["q", "scale"], ["qs"]),
             h.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]),
             h.make_node("MatMul", ["qs", "kt"], ["scores"]),
             *soft,
             h.make_node("MatMul", ["probs", "v"], ["out"])]
    g = h.make_graph(nodes, "attn", [h.make_tensor_value_info("x", T.FLOAT, [1, 8, 16])],
                     [h.make_tensor_value_info("out", T.FLOAT, [1, 2, 8, 4])], inits)
    onnx.save(h.make_model(g, opset_imports=[h.make_opsetid("", opset)], ir_version=9), path)
    return path


def _run(model: onnx.ModelProto | Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort

    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"]).run(None, feeds)


@pytest.mark.parametrize("flatten_axis, folded", [(3, 1), (-1, 1), (2, 0)])
def test_the_version_converters_softmax_folds_back_and_the_attention_is_tagged(tmp_path: Path, flatten_axis: int,
                                                                             folded: int) -> None:
    import onnx_ir as ir

    from stages.lib.fusion import apply_rules

    src = _attention(tmp_path / "a.onnx", flatten_axis)
    feeds = {"x": np.random.default_rng(1).standard_normal((1, 8, 16)).astype(np.float32)}
    model = ir.load(src)
    report = apply_rules(model, attention="canonical", fold_batchnorm=True, cleanup=True)
    assert report["rules"]["legacy_softmax"]["matches"] == folded
    # over the last axis the triple is one Softmax inside a tagged MHA chain; over axes 2-3 (the
    # flattened trailing axes: not a per-row softmax) it is left alone, and not called attention
    assert report["mha_groups"] == folded and report["unfused_softmax"] == 1 - folded
    out = _run(ir.to_proto(model), feeds)[0]
    np.testing.assert_allclose(out, _run(src, feeds)[0], rtol=1e-5, atol=1e-6)
    plain = _run(_attention(tmp_path / "plain.onnx", None), feeds)[0]
    assert np.allclose(out, plain, atol=1e-6) == bool(folded)


def test_the_version_converter_writes_the_triple_for_an_opset12_softmax() -> None:
    """Where the converter does write it: an opset-12 Softmax(axis=2) on a 4-D input (the PP-OCR
    recognizer's axis=3 on shapes it cannot infer is written the same way)."""
    from onnx import version_converter

    m = onnx.load_model_from_string(onnx.load(str(_attention_path_opset12())).SerializeToString())
    up = version_converter.convert_version(m, 19)
    ops = [n.op_type for n in up.graph.node]
    assert ops[ops.index("Softmax") - 1] == "Flatten" and ops[ops.index("Softmax") + 1] == "Reshape"


def _attention_path_opset12() -> Path:
    import tempfile

    folder = Path(tempfile.mkdtemp())
    m = onnx.load(str(_attention(folder / "a19.onnx", None)))
    m.opset_import[0].version = 12
    for n in m.graph.node:
        if n.op_type == "Softmax":
            n.attribute[0].i = 2
        if n.op_type == "Split":
            del n.attribute[[a.name for a in n.attribute].index("num_outputs")]
        if n.op_type == "Squeeze":
            del n.input[1]
            n.attribute.append(h.make_attribute("axes", [0]))
    onnx.save(m, folder / "a12.onnx")
    return folder / "a12.onnx"


def _cnn_with_shared_resize_scales(path: Path) -> Path:
    """Conv → two Resize nodes reading one scales initializer → Add → Cast(to=FLOAT) → Sigmoid:
    the shape of the PP-OCRv4 detector's upsampling path, FP32 in and out."""
    rng = np.random.default_rng(2)
    inits = [nh.from_array((rng.standard_normal((4, 3, 3, 3)) * 0.2).astype(np.float32), "w"),
             nh.from_array(np.zeros(4, np.float32), "b"),
             nh.from_array(np.array([1, 1, 2, 2], np.float32), "scales"),
             nh.from_array(np.array(1e6, np.float32), "huge")]  # clipped into FP16's range
    nodes = [h.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
             h.make_node("Resize", ["c", "", "scales"], ["r1"], mode="nearest"),
             h.make_node("Resize", ["c", "", "scales"], ["r2"], mode="nearest"),
             h.make_node("Add", ["r1", "r2"], ["s"]),
             h.make_node("Min", ["s", "huge"], ["m"]),
             h.make_node("Cast", ["m"], ["f"], to=T.FLOAT),
             h.make_node("Sigmoid", ["f"], ["y"])]
    g = h.make_graph(nodes, "cnn", [h.make_tensor_value_info("x", T.FLOAT, [1, 3, 8, 8])],
                     [h.make_tensor_value_info("y", T.FLOAT, [1, 4, 16, 16])], inits)
    onnx.save(h.make_model(g, opset_imports=[h.make_opsetid("", 19)], ir_version=9), path)
    return path


def test_an_fp32_graph_becomes_a_valid_fp16_graph_with_fp32_io(tmp_path: Path) -> None:
    import onnx_ir as ir

    from stages.lib.fusion.half import is_float32, to_float16

    src = _cnn_with_shared_resize_scales(tmp_path / "cnn.onnx")
    model = ir.load(src)
    assert is_float32(model)
    assert to_float16(model) > 0
    assert not is_float32(model)
    proto = ir.to_proto(model)
    onnx.checker.check_model(proto, full_check=True)  # typed, sorted, one writer per name
    assert [i.type.tensor_type.elem_type for i in proto.graph.input] == [T.FLOAT]
    assert [o.type.tensor_type.elem_type for o in proto.graph.output] == [T.FLOAT]
    assert [o.name for o in proto.graph.output] == ["y"]
    inits = {t.name: t.data_type for t in proto.graph.initializer}
    assert inits["w"] == inits["b"] == inits["huge"] == T.FLOAT16 and inits["scales"] == T.FLOAT
    casts = [n for n in proto.graph.node if n.op_type == "Cast"]
    assert sorted(n.attribute[0].i for n in casts) == sorted([T.FLOAT16, T.FLOAT16, T.FLOAT])  # in, the graph's own, out
    feeds = {"x": np.random.default_rng(3).standard_normal((1, 3, 8, 8)).astype(np.float32)}
    got, want = _run(proto, feeds)[0], _run(src, feeds)[0]
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=2e-3)


def test_fuse_converts_only_a_bring_your_own_fp32_graph(tmp_path: Path) -> None:
    """``fuse_graph(half=True)`` converts an FP32 graph and checks it at the FP16 tolerance; an
    FP16 graph (what the Qwen exporters write) passes through in its own type."""
    import onnx_ir as ir

    from stages.fuse import fuse_graph
    from stages.lib.fusion.half import is_float32, to_float16

    params = {"fold_batchnorm": True, "attention": "auto", "cleanup": True, "opset": 19}
    src = _cnn_with_shared_resize_scales(tmp_path / "cnn.onnx")
    for d in ("out", "out2", "out3"):
        (tmp_path / d).mkdir()
    entry = fuse_graph(src, tmp_path / "out" / "cnn.onnx", params, {}, 0, half=True)
    assert entry["converted_to"] == "float16" and entry["check"]["dtype"] == "float16"
    assert not is_float32(ir.load(tmp_path / "out" / "cnn.onnx"))
    half = ir.load(src)
    to_float16(half)
    ir.save(half, tmp_path / "half.onnx")
    again = fuse_graph(tmp_path / "half.onnx", tmp_path / "out2" / "cnn.onnx", params, {}, 0, half=True)
    assert again["converted_to"] is None
    plain = fuse_graph(src, tmp_path / "out3" / "cnn.onnx", params, {}, 0)
    assert plain["converted_to"] is None and is_float32(ir.load(tmp_path / "out3" / "cnn.onnx"))
