"""Tiny inline ONNX graphs for the quantization tests (built with onnx.helper)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

RNG = np.random.default_rng(0)


def _w(name: str, shape: tuple[int, ...], dt: type = np.float32, scale: float = 0.2) -> onnx.TensorProto:
    return numpy_helper.from_array((RNG.standard_normal(shape) * scale).astype(dt), name)


def _model(nodes: list, inputs: list, outputs: list, inits: list, opset: int = 19) -> onnx.ModelProto:
    g = helper.make_graph(nodes, "g", inputs, outputs, inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 10
    onnx.checker.check_model(m)
    return m


def _vi(name: str, shape: list, dt: int = TensorProto.FLOAT) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, dt, shape)


def conv_bn_relu_pool(dt: type = np.float32) -> onnx.ModelProto:
    t = TensorProto.FLOAT16 if dt == np.float16 else TensorProto.FLOAT
    c = 8
    inits = [
        _w("w1", (c, 3, 3, 3), dt), _w("b1", (c,), dt), _w("w2", (16, c, 3, 3), dt),
        numpy_helper.from_array(np.ones(c, dt), "bn_s"), numpy_helper.from_array(np.zeros(c, dt), "bn_b"),
        numpy_helper.from_array(np.zeros(c, dt), "bn_m"), numpy_helper.from_array(np.ones(c, dt), "bn_v"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c1", "bn_s", "bn_b", "bn_m", "bn_v"], ["bn"], name="bn1"),
        helper.make_node("Relu", ["bn"], ["r"], name="relu1"),
        helper.make_node("MaxPool", ["r"], ["p"], name="pool1", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p", "w2"], ["y"], name="conv2"),
    ]
    return _model(nodes, [_vi("x", [1, 3, 16, 16], t)], [_vi("y", [1, 16, 6, 6], t)], inits)


def residual_conv() -> onnx.ModelProto:
    inits = [_w("w1", (4, 4, 3, 3)), _w("w2", (4, 4, 1, 1))]
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c1", "x"], ["a"], name="add1"),
        helper.make_node("Relu", ["a"], ["r"], name="relu1"),
        helper.make_node("Conv", ["r", "w2"], ["y"], name="conv2"),
    ]
    return _model(nodes, [_vi("x", [1, 4, 8, 8])], [_vi("y", [1, 4, 8, 8])], inits)


def concat_convs() -> onnx.ModelProto:
    inits = [_w("wa", (4, 4, 1, 1)), _w("wb", (4, 4, 1, 1)), _w("wc", (4, 8, 1, 1))]
    nodes = [
        helper.make_node("Conv", ["x1", "wa"], ["ya"], name="conv_a"),
        helper.make_node("Conv", ["x2", "wb"], ["yb"], name="conv_b"),
        helper.make_node("Concat", ["x1", "x2"], ["cat"], name="cat", axis=1),
        helper.make_node("Conv", ["cat", "wc"], ["yc"], name="conv_c"),
    ]
    ins = [_vi("x1", [1, 4, 4, 4]), _vi("x2", [1, 4, 4, 4])]
    outs = [_vi("ya", [1, 4, 4, 4]), _vi("yb", [1, 4, 4, 4]), _vi("yc", [1, 4, 4, 4])]
    return _model(nodes, ins, outs, inits)


def conv_transpose_gemm() -> onnx.ModelProto:
    inits = [_w("wt", (4, 6, 2, 2)), _w("wg", (32, 96)), _w("bg", (32,))]
    nodes = [
        helper.make_node("ConvTranspose", ["x", "wt"], ["ct"], name="deconv", strides=[2, 2]),
        helper.make_node("Flatten", ["ct"], ["f"], name="flat"),
        helper.make_node("Gemm", ["f", "wg", "bg"], ["y"], name="gemm", transB=1),
    ]
    return _model(nodes, [_vi("x", [2, 4, 2, 2])], [_vi("y", [2, 32])], inits)


def mlp_block(seq: int = 32, d: int = 64, dt: type = np.float32, norm: str = "layernorm") -> onnx.ModelProto:
    """x → norm → MatMul+Add → Gelu → MatMul → residual Add (+ a tiny and a GEMV-like matmul)."""
    t = TensorProto.FLOAT16 if dt == np.float16 else TensorProto.FLOAT
    inits = [
        _w("w_up", (d, 2 * d), dt), _w("b_up", (2 * d,), dt), _w("w_down", (2 * d, d), dt),
        numpy_helper.from_array(np.ones(d, dt), "ln_g"), numpy_helper.from_array(np.zeros(d, dt), "ln_b"),
        _w("w_tiny", (d, 8), dt), _w("w_gemv", (d, 1), dt),
    ]
    if norm == "layernorm":
        nn = [helper.make_node("LayerNormalization", ["x", "ln_g", "ln_b"], ["h"], name="ln", axis=-1)]
    else:  # primitive RMSNorm
        inits.append(numpy_helper.from_array(np.array(1e-6, dt), "eps"))
        inits.append(numpy_helper.from_array(np.array(2.0, dt), "two"))
        inits.append(numpy_helper.from_array(np.array([-1], np.int64), "axes"))
        nn = [
            helper.make_node("Pow", ["x", "two"], ["sq"], name="rms_pow"),
            helper.make_node("ReduceMean", ["sq", "axes"], ["ms"], name="rms_mean", keepdims=1),
            helper.make_node("Add", ["ms", "eps"], ["mse"], name="rms_add"),
            helper.make_node("Sqrt", ["mse"], ["rt"], name="rms_sqrt"),
            helper.make_node("Div", ["x", "rt"], ["xn"], name="rms_div"),
            helper.make_node("Mul", ["xn", "ln_g"], ["h"], name="rms_mul"),
        ]
    nodes = nn + [
        helper.make_node("MatMul", ["h", "w_up"], ["u"], name="mlp/up/MatMul"),
        helper.make_node("Add", ["u", "b_up"], ["ub"], name="mlp/up/Add"),
        helper.make_node("Gelu", ["ub"], ["g"], name="mlp/act", domain=""),
        helper.make_node("MatMul", ["g", "w_down"], ["dn"], name="mlp/down/MatMul"),
        helper.make_node("Add", ["dn", "x"], ["y"], name="residual"),
        helper.make_node("MatMul", ["y", "w_tiny"], ["tiny"], name="head/tiny/MatMul"),
        helper.make_node("MatMul", ["y", "w_gemv"], ["gemv"], name="head/gemv/MatMul"),
    ]
    outs = [_vi("y", [1, seq, d], t), _vi("tiny", [1, seq, 8], t), _vi("gemv", [1, seq, 1], t)]
    return _model(nodes, [_vi("x", [1, seq, d], t)], outs, inits, opset=20)


def mha_block(seq: int = 16, d: int = 64, heads: int = 4, dt: type = np.float32, casts: bool = False) -> onnx.ModelProto:
    """Projections + primitive attention: MatMul(q,kT)→Mul→Add(mask)→Softmax→MatMul(v) + o-proj."""
    t = TensorProto.FLOAT16 if dt == np.float16 else TensorProto.FLOAT
    hd = d // heads
    inits = [
        _w("wq", (d, d), dt), _w("wk", (d, d), dt), _w("wv", (d, d), dt), _w("wo", (d, d), dt),
        numpy_helper.from_array(np.array([1, seq, heads, hd], np.int64), "split_shape"),
        numpy_helper.from_array(np.array([1, seq, d], np.int64), "merge_shape"),
        numpy_helper.from_array(np.array(1 / np.sqrt(hd), dt), "scale"),
        numpy_helper.from_array(np.triu(np.full((seq, seq), -1e4, np.float32 if casts else dt), 1), "mask"),
        numpy_helper.from_array(np.array(1 / np.sqrt(hd), np.float32), "scale32"),
    ]
    nodes = []
    for p in "qkv":
        nodes += [
            helper.make_node("MatMul", ["x", f"w{p}"], [f"{p}0"], name=f"attn/{p}_proj/MatMul"),
            helper.make_node("Reshape", [f"{p}0", "split_shape"], [f"{p}1"], name=f"attn/{p}_reshape"),
            helper.make_node("Transpose", [f"{p}1"], [f"{p}"], name=f"attn/{p}_t",
                             perm=[0, 2, 3, 1] if p == "k" else [0, 2, 1, 3]),
        ]
    if casts:  # as torch.onnx exports softmax in fp32 inside an fp16 graph: casts around it
        nodes += [
            helper.make_node("MatMul", ["q", "k"], ["s00"], name="attn/bmm1"),
            helper.make_node("Cast", ["s00"], ["s0"], name="attn/cast_up", to=TensorProto.FLOAT),
        ]
        t_mid = TensorProto.FLOAT
    else:
        nodes.append(helper.make_node("MatMul", ["q", "k"], ["s0"], name="attn/bmm1"))
        t_mid = t
    nodes += [
        helper.make_node("Mul", ["s0", "scale" if t_mid == t else "scale32"], ["s1"], name="attn/scale"),
        helper.make_node("Add", ["s1", "mask"], ["s2"], name="attn/mask"),
        helper.make_node("Softmax", ["s2"], ["pr0" if casts else "pr"], name="attn/softmax", axis=-1),
        *([helper.make_node("Cast", ["pr0"], ["pr"], name="attn/cast_down", to=t)] if casts else []),
        helper.make_node("MatMul", ["pr", "v"], ["o0"], name="attn/bmm2"),
        helper.make_node("Transpose", ["o0"], ["o1"], name="attn/o_t", perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["o1", "merge_shape"], ["o2"], name="attn/o_reshape"),
        helper.make_node("MatMul", ["o2", "wo"], ["y"], name="attn/o_proj/MatMul"),
    ]
    return _model(nodes, [_vi("x", [1, seq, d], t)], [_vi("y", [1, seq, d], t)], inits)


def fused(proto: onnx.ModelProto, attention: str | None = "canonical") -> onnx.ModelProto:
    """``proto`` as the quantize stage gets it: through the fuse stage's rules (no BN folding and
    no cleanup, so the tiny graphs keep their names), partitions tagged, shapes inferred."""
    import onnx_ir as ir

    from stages.lib.fusion import apply_rules

    model = ir.from_proto(onnx.shape_inference.infer_shapes(proto))
    apply_rules(model, attention=attention, fold_batchnorm=False, cleanup=False)
    return onnx.shape_inference.infer_shapes(ir.to_proto(model))


def rms_norm(gamma: np.ndarray, dt: type = np.float32) -> tuple[list, list]:
    """(initializers, nodes) of an RMSNorm ``x`` -> ``h`` (Mul by ``gamma``): the norm the AWQ
    scale folds into, shared by the int4 and streaming-quantize graphs."""
    inits = [numpy_helper.from_array(gamma.astype(dt), "gamma"),
             numpy_helper.from_array(np.array([-1], np.int64), "axes"),
             numpy_helper.from_array(np.array(1e-6, dt), "eps")]
    nodes = [helper.make_node("Mul", ["x", "x"], ["sq"], name="rms/sq"),
             helper.make_node("ReduceMean", ["sq", "axes"], ["ms"], name="rms/mean"),
             helper.make_node("Add", ["ms", "eps"], ["mse"], name="rms/eps"),
             helper.make_node("Sqrt", ["mse"], ["rt"], name="rms/sqrt"),
             helper.make_node("Div", ["x", "rt"], ["xn"], name="rms/div"),
             helper.make_node("Mul", ["gamma", "xn"], ["h"], name="rms/gamma")]
    return inits, nodes


def random_feed(model: onnx.ModelProto, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feed = {}
    for i in model.graph.input:
        shape = [d.dim_value for d in i.type.tensor_type.shape.dim]
        dt = helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type)
        feed[i.name] = rng.standard_normal(shape).astype(dt)
    return feed
