"""Tiny inline graphs shaped like torch.onnx.export output, for the rule tests, the engine
proof and the bench: attention blocks (Qwen ViT / decoder style) and a small conv stack.
They stand in until, and next to, the real exported graphs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import onnx


@dataclass(frozen=True)
class AttnSpec:
    scale: str = "qk_mul"  # qk_mul | qk_div | qk_sqrt_both (torchlib) | none
    mask: str | None = None  # None | causal | window | input
    kv_cache: bool = False  # K/V = Concat(past, new) on the sequence axis
    n_rep: int = 1  # GQA: query heads per KV head (repeat via Unsqueeze→Expand→Reshape)
    softmax_fp32: bool = False  # Cast→Softmax→Cast around the softmax (eager FP16 export)
    upcast_at: str = "softmax"  # with softmax_fp32: "bmm" casts right after BMM1 (scale, FP32 mask after)
    torchlib_kt: bool = False  # Kᵀ as Reshape→Transpose(3-D)→Reshape, as torchlib writes it
    dtype: str = "float32"
    opset: int = 19
    layers: int = 1
    batch: int = 1
    seq: int = 8
    past: int = 4
    heads: int = 4
    head_dim: int = 16


def attention_model(s: AttnSpec, seed: int = 0) -> onnx.ModelProto:
    import numpy as np
    import onnx
    from onnx import TensorProto, helper

    rng = np.random.default_rng(seed)
    np_dt = np.dtype(s.dtype)
    onnx_dt = helper.np_dtype_to_tensor_dtype(np_dt)
    H, D, Hkv = s.heads, s.head_dim, s.heads // s.n_rep
    E, B, S = H * D, s.batch, s.seq
    T = S + (s.past if s.kv_cache else 0)
    nodes, inits, inputs, outputs = [], [], [], []

    def const(name: str, arr: np.ndarray) -> str:
        inits.append(onnx.numpy_helper.from_array(arr, name))
        return name

    def node(op: str, ins: list[str], out: str, **attrs: Any) -> str:
        nodes.append(helper.make_node(op, ins, [out], name=out, **attrs))
        return out

    inputs.append(helper.make_tensor_value_info("x", onnx_dt, [B, S, E]))
    const("shape_q", np.array([B, S, H, D], np.int64))
    const("shape_kv", np.array([B, S, Hkv, D], np.int64))
    const("shape_out", np.array([B, S, E], np.int64))
    const("shape_rep", np.array([B, Hkv, s.n_rep, T, D], np.int64))
    const("shape_rep_out", np.array([B, H, T, D], np.int64))
    const("axis2", np.array([2], np.int64))
    const("shape_3d", np.array([-1, T, D], np.int64))
    const("shape_kt", np.array([B, H, D, T], np.int64))
    scale = 1.0 / np.sqrt(D)
    early = s.softmax_fp32 and s.upcast_at == "bmm"
    m_dt = np.dtype("float32") if early else np_dt  # the exporter's FP32 mask after an early upcast
    if s.mask in ("causal", "window"):
        i, j = np.arange(S)[:, None] + (T - S), np.arange(T)[None, :]
        keep = j <= i if s.mask == "causal" else (i // 4) == (j // 4)
        const("mask", np.where(keep, 0.0, np.finfo(m_dt).min).astype(m_dt)[None, None])
    elif s.mask == "input":
        inputs.append(helper.make_tensor_value_info("mask", helper.np_dtype_to_tensor_dtype(m_dt), [B, 1, S, T]))
    h = "x"
    for li in range(s.layers):
        p = f"l{li}_"
        w = {k: const(p + "w" + k, (rng.standard_normal((E, E if k in "qo" else Hkv * D)) / np.sqrt(E)).astype(np_dt))
             for k in "qkvo"}
        q = node("Transpose", [node("Reshape", [node("MatMul", [h, w["q"]], p + "q_proj"), "shape_q"], p + "q4")],
                 p + "q", perm=[0, 2, 1, 3])
        kv = {}
        for k in "kv":
            t = node("Transpose", [node("Reshape", [node("MatMul", [h, w[k]], p + k + "_proj"), "shape_kv"],
                                        p + k + "4")], p + k + "_new", perm=[0, 2, 1, 3])
            if s.kv_cache:
                inputs.append(helper.make_tensor_value_info(f"past_{k}_{li}", onnx_dt, [B, Hkv, s.past, D]))
                t = node("Concat", [f"past_{k}_{li}", t], p + k + "_cat", axis=2)
                outputs.append(helper.make_tensor_value_info(t, onnx_dt, [B, Hkv, T, D]))  # present
            if s.n_rep > 1:
                t = node("Unsqueeze", [t, "axis2"], p + k + "_unsq")
                t = node("Expand", [t, "shape_rep"], p + k + "_exp")
                t = node("Reshape", [t, "shape_rep_out"], p + k + "_rep")
            kv[k] = t
        if s.torchlib_kt:
            kt = node("Reshape", [node("Transpose", [node("Reshape", [kv["k"], "shape_3d"], p + "k3")],
                                       p + "k3t", perm=[0, 2, 1]), "shape_kt"], p + "kt")
        else:
            kt = node("Transpose", [kv["k"]], p + "kt", perm=[0, 1, 3, 2])
        if s.scale == "qk_sqrt_both":
            sq = const(p + "sqrt_scale", np.array(np.sqrt(scale), np_dt))
            q = node("Mul", [q, sq], p + "q_scaled")
            kt = node("Mul", [kt, sq], p + "kt_scaled")
        sc = node("MatMul", [q, kt], p + "scores")
        if early:
            sc = node("Cast", [sc], p + "scores_f32", to=TensorProto.FLOAT)
        if s.scale == "qk_mul":
            sc = node("Mul", [sc, const(p + "scale", np.array(scale, m_dt))], p + "scores_scaled")
        elif s.scale == "qk_div":
            sc = node("Div", [sc, const(p + "scale_div", np.array(1 / scale, m_dt))], p + "scores_scaled")
        if s.mask:
            sc = node("Add", [sc, "mask"], p + "scores_masked")
        if s.softmax_fp32 and not early:
            sc = node("Cast", [sc], p + "scores_f32", to=TensorProto.FLOAT)
        pr = node("Softmax", [sc], p + "probs", axis=-1)
        if s.softmax_fp32:
            pr = node("Cast", [pr], p + "probs_cast", to=onnx_dt)
        o = node("MatMul", [pr, kv["v"]], p + "ctx")
        o = node("Reshape", [node("Transpose", [o], p + "ctx_t", perm=[0, 2, 1, 3]), "shape_out"], p + "ctx_flat")
        h = node("Add", [h, node("MatMul", [o, w["o"]], p + "o_proj")], p + "resid")
    outputs.insert(0, helper.make_tensor_value_info(h, onnx_dt, [B, S, E]))
    graph = helper.make_graph(nodes, "attention_sample", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", s.opset)])
    model.ir_version = 10
    return model


def conv_model(seed: int = 0, channels: int = 8, size: int = 16, dtype: str = "float32") -> onnx.ModelProto:
    """Conv→BN→Relu→MaxPool, then a basic residual block Conv→BN→Relu→Conv→BN→Add(skip)→Relu."""
    import numpy as np
    import onnx
    from onnx import helper

    rng = np.random.default_rng(seed)
    dt = np.dtype(dtype)
    C = channels
    nodes, inits = [], []

    def const(name: str, arr: np.ndarray) -> str:
        inits.append(onnx.numpy_helper.from_array(arr.astype(dt), name))
        return name

    def conv_bn(x: str, cin: int, name: str) -> str:
        w = const(name + "_w", rng.standard_normal((C, cin, 3, 3)) / np.sqrt(9 * cin))
        nodes.append(helper.make_node("Conv", [x, w], [name + "_conv"], name=name + "_conv", pads=[1, 1, 1, 1]))
        bn = [const(name + k, v) for k, v in (
            ("_g", rng.uniform(0.5, 1.5, C)), ("_b", rng.standard_normal(C) * 0.1),
            ("_m", rng.standard_normal(C) * 0.1), ("_v", rng.uniform(0.5, 1.5, C)))]
        nodes.append(helper.make_node("BatchNormalization", [name + "_conv", *bn], [name + "_bn"],
                                      name=name + "_bn", epsilon=1e-5))
        return name + "_bn"

    def relu(x: str) -> str:
        nodes.append(helper.make_node("Relu", [x], [x + "_relu"], name=x + "_relu"))
        return x + "_relu"

    h = relu(conv_bn("pixel_values", 3, "stem"))
    nodes.append(helper.make_node("MaxPool", [h], ["pool"], name="pool", kernel_shape=[2, 2], strides=[2, 2]))
    b = relu(conv_bn("pool", C, "blk_a"))
    b = conv_bn(b, C, "blk_b")
    nodes.append(helper.make_node("Add", [b, "pool"], ["blk_add"], name="blk_add"))
    out = relu("blk_add")
    onnx_dt = helper.np_dtype_to_tensor_dtype(dt)
    graph = helper.make_graph(
        nodes, "conv_sample",
        [helper.make_tensor_value_info("pixel_values", onnx_dt, ["batch", 3, size, size])],
        [helper.make_tensor_value_info(out, onnx_dt, ["batch", C, size // 2, size // 2])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    model.ir_version = 10
    return model
