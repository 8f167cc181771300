"""The streaming quantize path (issue 11): lazy weights, codes computed when saved.

The lazy path is held to the bytes the eager one wrote: ``EAGER`` are digests of the quantized
models (initializer bytes, nodes, opset, stats) the previous, eager implementation (commit
18a4f0b: whole weights read and codes computed in place) produced on these graphs, with
made-up calibration ranges so no ORT rounding enters them. And the build reads each weight of a
decoder-like chain (tests/quantize_chain.py) once, once more when saved.
"""

from __future__ import annotations

import hashlib
import json
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from stages.lib.qdq import graphio, streamed_weights
from stages.lib.qdq.recipe import Calib, Recipe, build
from tests import qdq_graphs as G
from tests.quantize_chain import decoder_chain


def _rms_qkv(d: int = 128, seq: int = 32, dt: Any = np.float32, gemm: bool = False) -> onnx.ModelProto:
    """x -> RMSNorm (Mul by gamma) -> q/k/v projections (Gemm with transB: weights stored [N, K])."""
    t = TensorProto.FLOAT16 if dt == np.float16 else TensorProto.FLOAT
    lead = [seq] if gemm else [1, seq]
    rng = np.random.default_rng(3)
    inits, nodes = G.rms_norm(1 + 0.1 * rng.standard_normal(d), dt)
    outs = []
    for p in "qkv":
        inits.append(numpy_helper.from_array((rng.standard_normal((d, d)) * 0.1).astype(dt), f"w{p}"))
        if gemm:
            nodes.append(helper.make_node("Gemm", ["h", f"w{p}"], [p], name=f"attn/{p}_proj/Gemm", transB=1))
        else:
            nodes.append(helper.make_node("MatMul", ["h", f"w{p}"], [p], name=f"attn/{p}_proj/MatMul"))
        outs.append(helper.make_tensor_value_info(p, t, [*lead, d]))
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", t, [*lead, d])], outs, inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 19)])
    m.ir_version = 10
    return m


def _fresh(make: Any) -> Any:
    def build_() -> onnx.ModelProto:
        G.RNG = np.random.default_rng(0)  # the builders draw from one module-wide generator
        return onnx.shape_inference.infer_shapes(make())
    return build_


GRAPHS = {
    "conv": _fresh(G.conv_bn_relu_pool), "conv16": _fresh(lambda: G.conv_bn_relu_pool(np.float16)),
    "mlp16": _fresh(lambda: G.mlp_block(dt=np.float16)), "mha": _fresh(G.mha_block),
    # FP8 MHA Q/DQ goes on the fuse stage's mha partitions: the graph as fused
    "mha16": _fresh(lambda: G.fused(G.mha_block(dt=np.float16, casts=True))), "concat": _fresh(G.concat_convs),
    "deconv_gemm": _fresh(G.conv_transpose_gemm), "mlp128": _fresh(lambda: G.mlp_block(d=128)),
    "mlp128_16": _fresh(lambda: G.mlp_block(d=128, dt=np.float16)),
    "rms128_16": _fresh(lambda: G.mlp_block(d=128, dt=np.float16, norm="rms")),
    "qkv": _fresh(_rms_qkv), "qkv16": _fresh(lambda: _rms_qkv(dt=np.float16)),
    "qkv_gemm": _fresh(lambda: _rms_qkv(gemm=True)),
}
I4, I4P = {"int4_block": 64, "awq": True}, {"int4_block": 64, "awq": False}
EAGER: dict[tuple[str, str, str], tuple[dict[str, Any], str]] = {
    ("conv", "int8", ""): ({}, "1a5782304451901a2936"), ("conv", "fp8", ""): ({}, "a06cd8c783494340aa86"),
    ("conv16", "int8", ""): ({}, "0d45cfafafa49d51a3bb"), ("conv16", "fp8", ""): ({}, "85e0b91fb1f12877209f"),
    ("mlp16", "int8", ""): ({}, "ce2ea750e3cc4c6b3080"), ("mlp16", "fp8", ""): ({}, "e938ad1248cc8d60e69e"),
    ("mha", "int8", ""): ({}, "f252e65847a8ab7ecdaa"), ("mha", "fp8", ""): ({}, "eee756c4b640532910d0"),
    ("concat", "int8", ""): ({}, "bb62618483bfca35591c"), ("concat", "fp8", ""): ({}, "acc6536336a2eb7ac9c9"),
    ("deconv_gemm", "int8", ""): ({}, "42b7e71c5f5e52f33656"),
    ("deconv_gemm", "fp8", ""): ({}, "d6d4b8509cbf38811146"),
    ("mha16", "fp8", "mha"): ({"attention": "fp8-mha"}, "c183f07d0eca58e35967"),
    ("mlp128", "int4-weight", "awq"): (I4, "d3eb97d4ecffe2755832"),
    ("mlp128", "int4-weight", "plain"): (I4P, "357c62ebef531f338c04"),
    ("mlp128_16", "int4-weight", "awq"): (I4, "cc82b67e6ff22e6299b2"),
    ("mlp128_16", "int4-weight", "plain"): (I4P, "c3dcf8fff3e1d351ae12"),
    ("rms128_16", "int4-weight", "awq"): (I4, "62a975f7c315844419d0"),
    ("rms128_16", "int4-weight", "plain"): (I4P, "410e78cec7a8972148c5"),
    ("qkv", "int4-weight", "awq"): (I4, "17bda089e9575ed917f3"),
    ("qkv", "int4-weight", "plain"): (I4P, "48e98b10db2ec6139b36"),
    ("qkv16", "int4-weight", "awq"): (I4, "4ca9727ddc9810e6cfd4"),
    ("qkv16", "int4-weight", "plain"): (I4P, "fbcc0183e8b86ae8691e"),
    ("qkv_gemm", "int4-weight", "awq"): (I4, "9b8f20d801d4ff402b58"),
    ("qkv_gemm", "int4-weight", "plain"): (I4P, "c1c5abfc4bc5549dfee5"),
    ("deconv_gemm", "int4-weight", "awq"): (I4, "bd726e2f288acb8740fe"),
    ("deconv_gemm", "int4-weight", "plain"): (I4P, "22a16b6e5d7329fd0b82"),
}


def synthetic_calib(proto: onnx.ModelProto) -> Calib:
    """Ranges made up from the value names (no ORT run: the bytes depend on numpy alone)."""
    c = Calib()
    for v in list(proto.graph.input) + list(proto.graph.value_info) + list(proto.graph.output):
        dims = [d.dim_value for d in v.type.tensor_type.shape.dim]
        h = zlib.crc32(v.name.encode())
        c.amax[v.name] = 0.5 + (h % 1000) / 250
        c.amax_fp8[v.name] = c.amax[v.name] * 1.1
        if dims and all(dims):
            c.shapes[v.name] = tuple(dims)
            ms = np.random.default_rng(h).uniform(0.1, 4.0, dims[-1]).astype(np.float32)
            ms[: max(1, dims[-1] // 16)] *= 50  # a few salient channels
            c.chan_ms[v.name] = ms
    return c


def digest(model: ir.Model | onnx.ModelProto, stats: dict[str, Any]) -> str:
    p = model if isinstance(model, onnx.ModelProto) else graphio.to_proto(model)
    h = hashlib.sha256()
    for t in p.graph.initializer:
        h.update(f"{t.name}:{t.data_type}:{list(t.dims)}".encode())
        h.update(np.ascontiguousarray(numpy_helper.to_array(t)).view(np.uint8).tobytes())
    h.update(repr([(n.op_type, list(n.input), list(n.output), [helper.get_attribute_value(a) for a in n.attribute])
                   for n in p.graph.node]).encode())
    h.update(f"{p.opset_import[0].version}:{p.ir_version}".encode())
    h.update(json.dumps(stats, sort_keys=True).encode())
    return h.hexdigest()[:20]


@pytest.mark.parametrize("case", sorted(EAGER), ids="/".join)
def test_lazy_build_is_bit_identical_to_the_eager_one(case: tuple[str, str, str]) -> None:
    kw, want = EAGER[case]
    proto = GRAPHS[case[0]]()
    b = build(proto, Recipe(case[1], **kw), synthetic_calib(proto))
    assert digest(b.model, b.stats) == want


@pytest.mark.parametrize("case", [("mlp16", "int8", ""), ("conv16", "fp8", ""), ("rms128_16", "int4-weight", "awq"),
                                  ("qkv_gemm", "int4-weight", "awq"), ("deconv_gemm", "int4-weight", "plain")],
                         ids="/".join)
def test_chunked_reads_and_external_save_write_the_same_bytes(case: tuple[str, str, str], tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """From a file whose weights are external, in chunks of a few rows, saved tensor by tensor
    into external data: the same model, byte for byte."""
    monkeypatch.setattr(streamed_weights, "CHUNK_BYTES", 1024)
    kw, want = EAGER[case]
    proto = GRAPHS[case[0]]()
    src = tmp_path / "src" / "g.onnx"
    src.parent.mkdir()
    onnx.save_model(proto, str(src), save_as_external_data=True, location="g.onnx.data", size_threshold=0)
    structure = graphio.load_proto(src, in_file=True)
    assert all(t.data_location == TensorProto.EXTERNAL for t in structure.graph.initializer)
    b = build(structure, Recipe(case[1], **kw), synthetic_calib(proto))
    assert any(isinstance(v.const_value, ir.LazyTensor) for v in b.model.graph.initializers.values())
    dst = tmp_path / "out" / "g.onnx"
    dst.parent.mkdir()
    graphio.save(b.model, dst, external_above=0)
    assert (dst.parent / "g.onnx.data").is_file()
    assert digest(onnx.load(str(dst)), b.stats) == want


def test_build_reads_each_weight_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """int8: one read of every quantized weight for its scales, one more when saved; the
    structure load maps nothing."""
    path = decoder_chain(tmp_path / "fuse", layers=3, hidden=128)
    reads: list[int] = []
    real = np.fromfile

    def spy(*a: Any, **kw: Any) -> np.ndarray:
        arr = real(*a, **kw)
        reads.append(arr.nbytes)
        return arr

    monkeypatch.setattr(np, "fromfile", spy)
    structure = graphio.load_proto(path, in_file=True)
    assert not reads
    calib = Calib(amax={n: 4.0 for n in ("h0", "h1", "h2", "r0", "r1", "r2", "x3")})
    b = build(structure, Recipe("int8"), calib)
    weights = 3 * 2 * 128 * 128 * 2 + 128 * 256 * 2
    assert sum(reads) == weights and b.stats["weight_dq"] == 7
    ext = [v.const_value for v in b.model.graph.initializers.values() if isinstance(v.const_value, ir.ExternalTensor)]
    assert {t.name for t in ext} == {"gamma0", "gamma1", "gamma2"} and all(t.raw is None for t in ext)  # unmapped
    reads.clear()
    (tmp_path / "out").mkdir()
    graphio.save(b.model, tmp_path / "out" / "decoder.onnx", external_above=0)
    assert sum(reads) == weights  # the codes, computed again while written; the gammas are copied
