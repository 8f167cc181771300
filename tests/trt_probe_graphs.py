"""Tiny ONNX graphs with explicit Q/DQ, for probing what a TensorRT builder makes of them.

Used by the engine tests and `bench/timing_cache.py`: real builds on CPU (TensorRT-RTX) of
graphs small enough to build in about a second, in the three shapes that matter for a VLM
engine (a Conv+ReLU block, an attention block, an MLP). Quantization follows docs/FIELD_NOTES.md §2: symmetric,
per-channel weights, per-tensor activations, Q/DQ only on the inputs of Conv/MatMul, none
on the attention BMMs (that placement keeps the fused MHA kernel).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np

Mode = Literal["fp16", "int8", "fp8"]


class _G:
    """A small graph under construction (nodes + initializers), in one float dtype."""

    def __init__(self, mode: Mode, seed: int):
        self.mode = mode
        self.rng = np.random.default_rng(seed)
        self.nodes: list[Any] = []
        self.inits: list[Any] = []
        self.n = 0

    def name(self, base: str) -> str:
        self.n += 1
        return f"{base}_{self.n}"

    def const(self, arr: np.ndarray, base: str = "c") -> str:
        from onnx import numpy_helper

        n = self.name(base)
        self.inits.append(numpy_helper.from_array(arr, n))
        return n

    def node(self, op: str, inputs: list[str], base: str | None = None, **attrs: Any) -> str:
        from onnx import helper

        out = self.name(base or op.lower())
        self.nodes.append(helper.make_node(op, inputs, [out], name=f"{out}_node", **attrs))
        return out

    def qdq(self, x: str, amax: np.ndarray | float, axis: int | None = None) -> str:
        """Symmetric Q→DQ; per-tensor when amax is a scalar, per-channel along `axis` otherwise."""
        if self.mode == "fp16":
            return x
        from onnx import TensorProto, helper

        qmax = 127.0 if self.mode == "int8" else 448.0
        scale = np.asarray(np.maximum(amax, 1e-6) / qmax, dtype=np.float16)
        s = self.const(scale, "scale")
        if self.mode == "int8":
            z = self.const(np.zeros(scale.shape, np.int8), "zp")
        else:  # FP8 E4M3FN zero point: its dtype is what tells the parser "FP8"
            zn = self.name("zp")
            self.inits.append(helper.make_tensor(zn, TensorProto.FLOAT8E4M3FN, list(scale.shape),
                                                 [0] * int(scale.size)))
            z = zn
        kw = {} if axis is None else {"axis": axis}
        q = self.node("QuantizeLinear", [x, s, z], "q", **kw)
        return self.node("DequantizeLinear", [q, s, z], "dq", **kw)

    def weight(self, shape: tuple[int, ...], channel_axis: int) -> str:
        w = (self.rng.standard_normal(shape) * (1.0 / np.sqrt(np.prod(shape[1:]) or 1))).astype(np.float16)
        name = self.const(w, "w")
        other = tuple(i for i in range(w.ndim) if i != channel_axis)
        return self.qdq(name, np.abs(w.astype(np.float32)).max(axis=other), axis=channel_axis)

    def save(self, path: Path, inputs: list[Any], outputs: list[Any], opset: int = 19) -> Path:
        import onnx
        from onnx import helper

        g = helper.make_graph(self.nodes, path.stem, inputs, outputs, self.inits)
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], producer_name="vlmforge-probe")
        onnx.checker.check_model(m)
        path.parent.mkdir(parents=True, exist_ok=True)
        onnx.save(m, str(path))
        return path


def conv_relu(path: Path, mode: Mode = "int8", channels: int = 16, seed: int = 0) -> Path:
    """x[n,8,h,w] → Conv3x3 → ReLU → Conv3x3 → ReLU (two fusible Conv+ReLU blocks)."""
    from onnx import TensorProto, helper

    g = _G(mode, seed)
    x, cin = "x", 8
    for _ in range(2):
        xd = g.qdq(x, 4.0)
        w = g.weight((channels, cin, 3, 3), channel_axis=0)
        b = g.const(np.zeros(channels, np.float16), "b")
        c = g.node("Conv", [xd, w, b], "conv", pads=[1, 1, 1, 1])
        x, cin = g.node("Relu", [c], "relu"), channels
    g.nodes[-1].output[0] = "y"
    fp16 = TensorProto.FLOAT16
    return g.save(path, [helper.make_tensor_value_info("x", fp16, ["n", 8, "h", "w"])],
                  [helper.make_tensor_value_info("y", fp16, ["n", channels, "h", "w"])])


def mha_mlp(path: Path, mode: Mode = "fp16", dim: int = 64, heads: int = 2, blocks: int = 1, seed: int = 0) -> Path:
    """x[b,s,dim] → blocks × (attention + GELU-free MLP), the ViT/decoder block shape.

    Attention is the primitive MatMul→Mul(scale)→Softmax→MatMul subgraph TensorRT fuses into
    one MHA kernel; Q/DQ sit only on projection inputs (x and weights), never on the BMMs.
    """
    from onnx import TensorProto, helper

    g = _G(mode, seed)
    dh = dim // heads
    x = "x"
    for _ in range(blocks):
        xd = g.qdq(x, 4.0)
        qkv = g.node("MatMul", [xd, g.weight((dim, 3 * dim), channel_axis=1)], "qkv")
        r = g.node("Reshape", [qkv, g.const(np.array([0, 0, 3, heads, dh], np.int64), "shape")])
        t = g.node("Transpose", [r], perm=[2, 0, 3, 1, 4])  # [3, b, h, s, dh]
        q, k, v = (g.node("Gather", [t, g.const(np.array(i, np.int64), "idx")], axis=0) for i in range(3))
        kt = g.node("Transpose", [k], perm=[0, 1, 3, 2])
        s = g.node("MatMul", [q, kt], "bmm1")
        s = g.node("Mul", [s, g.const(np.array(1 / np.sqrt(dh), np.float16), "sc")])
        p = g.node("Softmax", [s], axis=-1)
        o = g.node("MatMul", [p, v], "bmm2")
        o = g.node("Transpose", [o], perm=[0, 2, 1, 3])
        o = g.node("Reshape", [o, g.const(np.array([0, 0, dim], np.int64), "shape")])
        o = g.node("MatMul", [g.qdq(o, 4.0), g.weight((dim, dim), channel_axis=1)], "proj")
        x = g.node("Add", [x, o], "res")
        h = g.node("MatMul", [g.qdq(x, 4.0), g.weight((dim, 4 * dim), channel_axis=1)], "fc1")
        h = g.node("Relu", [h])
        h = g.node("MatMul", [g.qdq(h, 4.0), g.weight((4 * dim, dim), channel_axis=1)], "fc2")
        x = g.node("Add", [x, h], "res")
    g.nodes[-1].output[0] = "y"
    fp16 = TensorProto.FLOAT16
    return g.save(path, [helper.make_tensor_value_info("x", fp16, ["b", "s", dim])],
                  [helper.make_tensor_value_info("y", fp16, ["b", "s", dim])])
