"""The streaming quantize path (issue 11): lazy weights, codes computed when saved, every run
through the block runner, sensitivity scored per block past a size.

The lazy path is held to the bytes the eager one wrote: ``EAGER`` are digests of the quantized
models (initializer bytes, nodes, opset, stats) the previous, eager implementation (commit
18a4f0b: whole weights read and codes computed in place) produced on these graphs, with
made-up calibration ranges so no ORT rounding enters them.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from pipeline.stage import StageContext
from stages.lib.qdq import graphio, heldout, streamed_weights
from stages.lib.qdq import sensitivity as S
from stages.lib.qdq.block_scores import extract
from stages.lib.qdq.recipe import Calib, Recipe, build
from stages.lib.segments import runner as segments
from stages.lib.segments.cuts import CUTS_KEY, SCOPES_KEY
from stages.lib.segments.plan import plan
from tests import qdq_graphs as G

REPO = Path(__file__).resolve().parent.parent


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


def _default_gates() -> dict[str, Any]:
    """The gates the config gives every quantized precision (params carry them, the stage reads them)."""
    from pipeline.config import BuildConfig

    cfg = BuildConfig.model_validate({"name": "t", "model": {"generate": "tiny", "family": "qwen2_5_vl"},
                                      "targets": ["rtx4090"]})
    return {p: g.model_dump(mode="json") for p, g in cfg.gates.items()}


_GATES = _default_gates()


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


# ---- a decoder-like chain with external data and a cut list ---------------------------------------


def decoder_chain(folder: Path, layers: int, hidden: int, vocab: int = 256, seed: int = 0,
                  scope: str = "layers") -> Path:
    """``inputs_embeds`` -> layers x [Mul(gamma) -> up MatMul -> Relu -> down MatMul -> + residual]
    -> lm_head MatMul -> ``logits``, FP16, cut after every layer (``vlmforge.segment_cuts``). The
    weights are written one at a time into ``decoder.onnx.data``, never all in memory.
    ``scope="blocks"``: a vision tower's layout instead, ``blocks.N`` name scopes on every node
    (as torch.onnx writes them) and no recorded cuts."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    inits, nodes, cuts, x, offset = [], [], [], "inputs_embeds", 0
    with open(folder / "decoder.onnx.data", "wb") as f:
        def put(name: str, arr: np.ndarray) -> None:
            nonlocal offset
            f.write(arr.tobytes())
            t = TensorProto(name=name, data_type=TensorProto.FLOAT16, dims=list(arr.shape),
                            data_location=TensorProto.EXTERNAL)
            for k, v in (("location", "decoder.onnx.data"), ("offset", str(offset)), ("length", str(arr.nbytes))):
                t.external_data.add(key=k, value=v)
            inits.append(t)
            offset += arr.nbytes
            f.write(b"\0" * (-offset % 4096))
            offset += -offset % 4096

        for i in range(layers):
            put(f"gamma{i}", (1 + 0.2 * rng.standard_normal(hidden)).astype(np.float16))
            for w in ("up", "down"):
                put(f"{w}{i}", (rng.standard_normal((hidden, hidden), np.float32) / np.sqrt(hidden)).astype(np.float16))
            s = f"/model/{scope}.{i}"
            block = [helper.make_node("Mul", [x, f"gamma{i}"], [f"h{i}"], name=f"{s}/norm/Mul"),
                     helper.make_node("MatMul", [f"h{i}", f"up{i}"], [f"u{i}"], name=f"{s}/mlp/up_proj/MatMul"),
                     helper.make_node("Relu", [f"u{i}"], [f"r{i}"], name=f"{s}/mlp/act"),
                     helper.make_node("MatMul", [f"r{i}", f"down{i}"], [f"d{i}"], name=f"{s}/mlp/down_proj/MatMul"),
                     helper.make_node("Add", [f"d{i}", x], [f"x{i + 1}"], name=f"{s}/residual")]
            for n in block if scope != "layers" else []:
                n.metadata_props.add(key=SCOPES_KEY, value=repr(["", f"model.{scope}.{i}", f"model.{scope}.{i}.mlp",
                                                                   n.op_type.lower()]))
            nodes += block
            x = f"x{i + 1}"
            cuts.append(x)
        put("lm_head", (rng.standard_normal((hidden, vocab), np.float32) / np.sqrt(hidden)).astype(np.float16))
    nodes.append(helper.make_node("MatMul", [x, "lm_head"], ["logits"], name="/lm_head/MatMul"))
    g = helper.make_graph(nodes, "decoder", [helper.make_tensor_value_info("inputs_embeds", TensorProto.FLOAT16,
                                                                           ["batch", "seq", hidden])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT16, ["batch", "seq", vocab])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 19)])
    m.ir_version = 10
    if scope == "layers":
        m.metadata_props.add(key=CUTS_KEY, value=json.dumps(cuts))
    onnx.save_model(m, str(folder / "decoder.onnx"))
    return folder / "decoder.onnx"


def chain_feeds(hidden: int, n: int = 2, seq: int = 8) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(7)
    return [{"inputs_embeds": rng.standard_normal((1, seq, hidden)).astype(np.float16)} for _ in range(n)]


def calibrate(path: Path, feeds: list[dict[str, np.ndarray]], out: Path) -> Calib:
    """ranges_decoder.json/.npz as the calibrate stage writes them (its segmented collector)."""
    from stages.lib.qdq import calibrators as C

    col = C.collector(ir.from_proto(graphio.load_proto(path, in_file=True)))
    segments.run_segmented(path, feeds, lambda seg, i, v: col.update(v, count=seg.index == 0), expose=col.names)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ranges_decoder.json").write_text(json.dumps({"order": col.names, "tensors": col.ranges("max")}))
    np.savez(out / "ranges_decoder.npz", **col.arrays())  # type: ignore[arg-type]
    return Calib.load(out / "ranges_decoder.json")


def _ctx(fuse: Path, cal: Path, out: Path) -> StageContext:
    out.mkdir(parents=True, exist_ok=True)
    return StageContext("quantize@t", {"gates": _GATES}, {"fuse": fuse, "calibrate": cal}, out, None, [])


GQ = {"keep_high_precision": [], "int4_block": 128, "attention": "none", "accuracy_budget": None}


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


def test_run_all_same_runner_for_files_and_models(tmp_path: Path) -> None:
    path = decoder_chain(tmp_path / "fuse", layers=3, hidden=64)
    feeds = chain_feeds(64)
    from_file = heldout.run_all(path, feeds, ["logits"])
    in_memory = heldout.run_all(graphio.load(path), feeds, ["logits"])
    for a, b in zip(from_file, in_memory, strict=True):
        np.testing.assert_array_equal(a["logits"], b["logits"])
    assert len(plan(path).segments) == 4  # three layers, then the head
    whole = graphio.run(graphio.session(path), feeds[0])["logits"].astype(np.float32)
    np.testing.assert_allclose(from_file[0]["logits"], whole, atol=2e-2, rtol=2e-2)  # FP16 at the cuts


def test_extract_cuts_out_one_block(tmp_path: Path) -> None:
    path = decoder_chain(tmp_path / "fuse", layers=3, hidden=64)
    feeds = chain_feeds(64)
    ref = segments.run_whole(path, feeds[0], ["x1", "x2"])
    sub = extract(ir.from_proto(graphio.load_proto(path, in_file=True)), {"x1": ref["x1"].dtype}, ["x2"])
    assert [v.name for v in sub.graph.inputs] == ["x1"] and set(sub.graph.initializers) == {"gamma1", "up1", "down1"}
    with graphio.spilled(sub, tmp_path) as sub_path:
        got = segments.run_whole(sub_path, {"x1": ref["x1"]}, cuts=[])
    np.testing.assert_array_equal(got["x2"], ref["x2"])


@pytest.mark.parametrize("block", [True, False], ids=["block", "whole"])
def test_sensitivity_ranks_the_sabotaged_layer_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    block: bool) -> None:
    if block:  # the tiny chain past the size where groups are scored at their own block
        monkeypatch.setattr(S, "RANK_WHOLE_BYTES", 0)
    path = decoder_chain(tmp_path / "fuse", layers=3, hidden=64)
    feeds = chain_feeds(64, n=3)
    calib = calibrate(path, feeds, tmp_path / "cal")
    calib.amax["r1"] *= 40  # layer 1's down projection input: by far the worst
    ev = S.Evaluator(feeds, heldout.run_all(path, feeds, ["logits"]), ["logits"], workdir=tmp_path)
    built, rep = S.run(path, Recipe("int8"), calib, 0.9999, ev)
    assert rep.scored == ("block" if block else "whole graph")
    assert rep.ranking[0]["group"] == "layers.1/mlp"
    if block:
        assert {r["scored_at"] for r in rep.ranking} == {"x1", "x2", "x3", "logits"}
    assert rep.kept[0]["group"] == "layers.1/mlp" and rep.met
    assert "/model/layers.1/mlp/down_proj/MatMul" not in built.placement.quantized_nodes()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("vlmforge-qdq-")]  # candidates removed


def test_block_ranking_reuses_the_references_pass(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The search references' own pass keeps every value a segment hands on (reference_pass):
    the ranking then runs no pass of the unquantized graph and ranks exactly as with its own."""
    from stages.lib.qdq import block_scores

    monkeypatch.setattr(S, "RANK_WHOLE_BYTES", 0)
    path = decoder_chain(tmp_path / "fuse", layers=3, hidden=64)
    feeds = chain_feeds(64, n=3)
    calib = calibrate(path, feeds, tmp_path / "cal")
    calib.amax["r1"] *= 40
    refs, values = block_scores.reference_pass(path, feeds, ["logits"])
    for a, b in zip(refs, heldout.run_all(path, feeds, ["logits"]), strict=True):
        np.testing.assert_array_equal(a["logits"], b["logits"])  # the same runner as the candidates'
    runs: list[str] = []
    real = segments.run_segmented
    monkeypatch.setattr(segments, "run_segmented", lambda src, *a, **k: (runs.append(Path(src).name), real(src, *a, **k))[1])
    ranked = {}
    for given in (values, None):
        runs.clear()
        ev = S.Evaluator(feeds, refs, ["logits"], workdir=tmp_path, values=given)
        ranked[given is None] = block_scores.block_ranking(path, graphio.load_proto(path, in_file=True), Recipe("int8"),
                                                           calib, _groups(path, calib), ev, block_scores.rank_cuts(
                                                               graphio.load_proto(path, in_file=True)))
        assert runs.count("decoder.onnx") == (0 if given is not None else 1)
    assert ranked[True] == ranked[False]
    assert max(ranked[True], key=lambda r: r["loss"])["group"] == "layers.1/mlp"  # the sabotaged one


def _groups(path: Path, calib: Calib) -> dict[str, list[str]]:
    b = build(graphio.load_proto(path, in_file=True), Recipe("int8"), calib)
    groups: dict[str, list[str]] = {}
    for node in sorted(b.placement.quantized_nodes()):
        groups.setdefault(S.group_of(b.placement.scopes.get(node) or node), []).append(node)
    return groups


def test_a_tower_without_recorded_cuts_is_ranked_at_its_name_scope_blocks(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A vision tower records no cuts (it runs whole everywhere else); past RANK_WHOLE_BYTES its
    groups are still scored block by block, split at its ``blocks.N`` name scopes."""
    monkeypatch.setattr(S, "RANK_WHOLE_BYTES", 0)
    path = decoder_chain(tmp_path / "fuse", layers=3, hidden=64, scope="blocks")
    assert len(plan(path).segments) == 1  # the runner runs it whole
    feeds = chain_feeds(64, n=3)
    calib = calibrate(path, feeds, tmp_path / "cal")
    calib.amax["r2"] *= 40  # block 2's down projection input
    ev = S.Evaluator(feeds, heldout.run_all(path, feeds, ["logits"]), ["logits"], workdir=tmp_path)
    built, rep = S.run(path, Recipe("int8"), calib, 0.9999, ev)
    assert rep.scored == "block" and rep.ranking[0]["group"] == "blocks.2/mlp"
    assert {r["scored_at"] for r in rep.ranking} == {"x1", "x2", "x3", "logits"}
    assert rep.kept[0]["group"] == "blocks.2/mlp" and rep.met


@pytest.mark.parametrize("mode", ["int8", "fp8", "int4-weight"])
def test_stage_quantizes_an_external_decoder_block_by_block(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            mode: str) -> None:
    from stages import quantize

    monkeypatch.setattr(graphio, "EXTERNAL_DATA_BYTES", 0)  # as a big graph is saved
    path = decoder_chain(tmp_path / "fuse", layers=3, hidden=256)
    feeds = chain_feeds(256)
    calibrate(path, feeds, tmp_path / "cal")
    ctx = _ctx(path.parent, tmp_path / "cal", tmp_path / "out")
    entry, checks = quantize._quantize_graph(ctx, "decoder", mode, GQ, feeds, [{}])
    assert entry["runner"] == "segments" and entry["checker"]
    assert entry["parity"]["vs_unquantized"]["cosine"] > (0.98 if mode == "int4-weight" else 0.995)
    assert entry["weight_dq"] == (6 if mode == "int4-weight" else 7)  # int4 keeps the lm_head
    if mode == "int4-weight":
        assert entry["int4_awq"]["chosen"] in ("awq", "plain")
    assert sorted(p.name for p in ctx.out.iterdir()) == ["decoder.onnx", "decoder.onnx.data"]
    bare = onnx.load(str(ctx.out / "decoder.onnx"), load_external_data=False)
    assert json.loads(next(p.value for p in bare.metadata_props if p.key == CUTS_KEY)) == ["x1", "x2", "x3"]
    assert any(t.data_location == TensorProto.EXTERNAL for t in bare.graph.initializer)


PEAK = """
import json, sys, time
from pathlib import Path


def hwm():  # peak RSS of this process in MiB
    return next(int(x.split()[1]) for x in open("/proc/self/status") if x.startswith("VmHWM")) / 1024


import onnxruntime  # noqa: F401 - imported before the baseline: its libraries are no graph's memory
from pipeline.stage import StageContext
from stages import quantize
from stages.lib.qdq import graphio, heldout
from tests.test_quantize_streaming import _GATES, GQ, chain_feeds

fuse, cal, out, mode, hidden = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4], int(sys.argv[5])
graphio.EXTERNAL_DATA_BYTES = 0  # written as a big graph's are, tensor by tensor (not one inline proto)
feeds = chain_feeds(hidden)
out.mkdir(parents=True)
ctx = StageContext("quantize@t", {"gates": _GATES}, {"fuse": fuse, "calibrate": cal}, out, None, [])
before, t = hwm(), time.time()
if mode == "runner":  # the block runner alone, over the unquantized graph: the floor
    heldout.run_all(fuse / "decoder.onnx", feeds, ["logits"])
    entry = {"weight_dq": 0, "parity": {"vs_unquantized": {"cosine": 1.0}}}
else:
    entry, _ = quantize._quantize_graph(ctx, "decoder", mode, GQ, feeds, [{}])
print(json.dumps({"before": before, "peak": hwm(), "seconds": time.time() - t, "weight_dq": entry["weight_dq"],
                  "cosine": entry["parity"]["vs_unquantized"]["cosine"]}))
"""


def _synthetic_ranges(path: Path, out: Path, hidden: int) -> None:
    """Made-up ranges for every value (a calibration run would cost the test its time)."""
    names = [o for n in onnx.load(str(path), load_external_data=False).graph.node for o in n.output]
    ms = np.ones(hidden, np.float32)
    ms[:8] = 50.0  # salient channels, so AWQ has something to find
    tensors = {n: {"amax": 6.0, "amax_fp8": 6.0, "shape": [1, 8, hidden]} for n in names}
    out.mkdir(parents=True, exist_ok=True)
    (out / "ranges_decoder.json").write_text(json.dumps({"order": names, "tensors": tensors}))
    np.savez(out / "ranges_decoder.npz", **{f"chan_ms_{i}": ms for i in range(len(names))})  # type: ignore[arg-type]


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads VmHWM from /proc")
def test_peak_memory_is_about_one_layer(tmp_path: Path) -> None:
    """8 layers of 64 MiB FP16 weights (512 MiB) quantized by the stage, each run in a fresh
    process: the peak RSS is the block runner's own (one segment's ORT session, a few copies of
    one layer) plus less than a layer, never the graph. (The eager path this replaced peaked at
    ~4.9 GB on this graph.)"""
    hidden, layers = 4096, 8
    path = decoder_chain(tmp_path / "fuse", layers=layers, hidden=hidden)
    _synthetic_ranges(path, tmp_path / "cal", hidden)
    layer_mb = 2 * hidden * hidden * 2 / 2**20

    def peak(mode: str) -> float:
        r = subprocess.run([sys.executable, "-c", PEAK, str(path.parent), str(tmp_path / "cal"), str(tmp_path / mode),
                            mode, str(hidden)], cwd=REPO, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-3000:]
        got = json.loads(r.stdout.splitlines()[-1])
        grew = float(got["peak"] - got["before"])
        print(f"{mode}: peak RSS {got['peak']:.0f} MiB (+{grew:.0f} MiB over imports) in {got['seconds']:.0f} s; "
              f"weights {layers * layer_mb:.0f} MiB, one layer {layer_mb:.0f} MiB")
        assert mode == "runner" or (got["weight_dq"] >= 2 * layers and np.isfinite(got["cosine"]))
        return grew

    floor = peak("runner")
    assert floor < 5 * layer_mb
    for mode in ("int8", "fp8", "int4-weight"):
        assert peak(mode) < floor + layer_mb
