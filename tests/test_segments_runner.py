"""The segment runner (``stages.lib.segments.runner``): block-by-block execution of a decoder graph,
equal to the whole-graph session, each segment holding only its own weights; graphs with external
data, cut lists that name no value and subgraphs reading outer values; the segmented session the
generation loop uses; and (slow) a peak memory of about one layer.

The decoder is the tiny default's, exported and fused (tests/segments_decoder.py); the other
graphs are MatMul chains made here.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from stages.lib.qdq import graphio
from stages.lib.segments import runner as S
from stages.lib.segments.cuts import CUTS_KEY, read_cuts
from stages.lib.segments.plan import model_cuts, plan
from tests.segments_decoder import _export, tiny_decoder

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The tiny default (FP16) decoder, exported and fused: two layers, so three segments."""
    return tiny_decoder(tmp_path_factory)


def _feed(path: Path, seq: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feed: dict[str, np.ndarray] = {}
    for a in S.graph_inputs(path):
        dt = np.float16 if a.type == "tensor(float16)" else np.float32
        if a.name == "inputs_embeds":
            feed[a.name] = rng.standard_normal((1, seq, int(a.shape[2]))).astype(dt)  # type: ignore[arg-type]
        elif a.name == "attention_mask":
            feed[a.name] = np.ones((1, seq), np.int64)
        elif a.name == "position_ids":
            feed[a.name] = np.broadcast_to(np.arange(seq), (3, 1, seq)).copy()
        else:  # past_key_values.*: zero-length past
            feed[a.name] = np.zeros((1, int(a.shape[1]), 0, int(a.shape[3])), dt)  # type: ignore[arg-type]
    return feed


def test_fused_decoder_keeps_its_cuts(tiny: dict[str, Any]) -> None:
    import onnx_ir as ir

    m = onnx.load(str(tiny["fp16"]), load_external_data=False)
    cuts = read_cuts(m)
    assert len(cuts) == 2  # one per decoder layer of the tiny model
    assert set(cuts) <= {o for n in m.graph.node for o in n.output}
    assert model_cuts(m) == cuts
    from stages.lib.segments.cuts import cuts_from_name_scopes

    assert cuts_from_name_scopes(ir.load(tiny["fp16"])) == cuts  # name scopes survive fusion too


def test_segments_equal_the_whole_graph(tiny: dict[str, Any]) -> None:
    path = tiny["fp16"]
    p = plan(path)
    assert len(p.segments) == 3  # two layers, then norm + lm_head
    proto = onnx.load(str(path), load_external_data=False)
    assert sorted(i for s in p.segments for i in s.nodes) == list(range(len(proto.graph.node)))
    sess = graphio.session(path)
    for seq in (7, 19):
        feed = _feed(path, seq, seed=seq)
        ref = graphio.run(sess, feed)
        got = S.run_whole(path, feed)
        assert list(got) == [o.name for o in proto.graph.output]
        for k, r in ref.items():
            # bit-equal in the first layer; after a cut the carried value is rounded to FP16, while
            # the whole-graph session's inserted FP32 Casts keep it wide across the layer boundary
            np.testing.assert_allclose(got[k].astype(np.float32), r.astype(np.float32), atol=2e-2, rtol=2e-2)
            if k.startswith("present.0."):
                np.testing.assert_array_equal(got[k], r)
        whole = S.run_whole(path, feed, cuts=[])  # no cuts: one segment, the whole graph
        for k, r in ref.items():
            np.testing.assert_array_equal(whole[k], r)


def test_segments_hold_only_their_initializers(tiny: dict[str, Any]) -> None:
    path = tiny["fp16"]
    p = plan(path)
    inits = [set(s.initializers) for s in p.segments]
    dims = {t.name: list(t.dims) for t in p.proto.graph.initializer}
    # no two segments share a weight matrix; fuse's deduplication does merge equal small vectors
    # across layers (the tiny model's norm weights and biases, shape constants)
    shared = {n for i, a in enumerate(inits) for b in inits[i + 1:] for n in a & b}
    assert all(len(dims[n]) <= 1 for n in shared)
    assert sum(len(dims[n]) == 2 for n in set().union(*inits)) == sum(len(dims[n]) == 2 for a in inits for n in a)
    mats = [{n for n in a if len(dims[n]) == 2} for a in inits]
    assert {n.split(".")[2] for n in mats[0]} == {"0"} and {n.split(".")[2] for n in mats[1]} == {"1"}
    assert mats[2] == {"lm_head.weight_t"}
    built = S._segment_proto(p, p.segments[1], S.run_whole(path, _feed(path, 5), outputs=list(p.segments[1].inputs)))
    assert {t.name for t in built.graph.initializer} == inits[1]
    assert {v.name for v in built.graph.input} == set(p.segments[1].inputs)


def _chain(folder: Path, layers: int, width: int, rows: int = 4, external: bool = True) -> tuple[Path, list[str]]:
    """x -> MatMul(w0) -> Relu -> ... -> MatMul(w{n-1}) -> y: one "layer" per weight."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    tile = (rng.standard_normal((min(width, 256), width)) / np.sqrt(width)).astype(np.float32)
    nodes, inits, x = [], [], "x"
    cuts = []
    for i in range(layers):
        w = np.tile(tile, (width // tile.shape[0], 1)) * (1 + i / 10)
        inits.append(numpy_helper.from_array(w.astype(np.float32), f"w{i}"))
        nodes.append(helper.make_node("MatMul", [x, f"w{i}"], [f"m{i}"], name=f"/layers.{i}/MatMul"))
        nodes.append(helper.make_node("Relu", [f"m{i}"], [f"h{i}"], name=f"/layers.{i}/Relu"))
        x = f"h{i}"
        cuts.append(x)
    nodes.append(helper.make_node("Identity", [x], ["y"], name="/out"))
    g = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", width])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", width])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 19)])
    m.ir_version = 10
    m.metadata_props.add(key=CUTS_KEY, value=json.dumps(cuts[:-1]))
    path = folder / "chain.onnx"
    onnx.save_model(m, str(path), save_as_external_data=external, all_tensors_to_one_file=True,
                    location="chain.onnx.data", size_threshold=0)
    return path, cuts[:-1]


def _reference(path: Path, x: np.ndarray) -> np.ndarray:
    m = onnx.load(str(path))
    for t in m.graph.initializer:
        x = np.maximum(x @ numpy_helper.to_array(t), 0)
    return x


@pytest.mark.parametrize("inline", [True, False])
def test_external_data_graph(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, inline: bool) -> None:
    if not inline:  # each segment is written to its own temporary folder, as past the proto limit
        monkeypatch.setattr(S, "INLINE_LIMIT", 0)
    path, cuts = _chain(tmp_path / "g", layers=4, width=64)
    assert not onnx.load(str(path), load_external_data=False).graph.initializer[0].raw_data  # really external
    x = np.random.default_rng(1).standard_normal((3, 64)).astype(np.float32)
    seen: list[tuple[int, int, list[str]]] = []
    p = S.run_segmented(path, [{"x": x}, {"x": x[:1]}], lambda seg, i, v: seen.append((seg.index, i, sorted(v))),
                        expose=["x", "m1", "y"])
    assert [s.initializers for s in p.segments] == [("w0",), ("w1",), ("w2",), ("w3",)]
    # segment-major; exposed values come with the segment that makes them (graph inputs: the first)
    assert seen == [(0, 0, ["x"]), (0, 1, ["x"]), (1, 0, ["m1"]), (1, 1, ["m1"]), (2, 0, []), (2, 1, []),
                    (3, 0, ["y"]), (3, 1, ["y"])]
    np.testing.assert_allclose(S.run_whole(path, {"x": x})["y"], _reference(path, x), rtol=1e-5, atol=1e-5)


def test_bad_cuts_and_subgraphs_are_clear(tmp_path: Path) -> None:
    path, _ = _chain(tmp_path / "g", layers=2, width=8, external=False)
    with pytest.raises(ValueError, match="'nope' is not a value the main graph computes \\(segment cut\\)"):
        plan(path, cuts=["nope"])
    # an If whose branches read outer values: those values are carried into its segment
    then = helper.make_graph([helper.make_node("Add", ["h0", "m0"], ["t"])], "then", [],
                             [helper.make_tensor_value_info("t", TensorProto.FLOAT, None)])
    other = helper.make_graph([helper.make_node("Identity", ["h0"], ["e"])], "else", [],
                              [helper.make_tensor_value_info("e", TensorProto.FLOAT, None)])
    m = onnx.load(str(path))
    m.graph.node.insert(len(m.graph.node) - 1, helper.make_node("ReduceMax", ["x"], ["mx"], keepdims=0))
    m.graph.node.insert(len(m.graph.node) - 1, helper.make_node("Greater", ["mx", "zero"], ["c"]))
    m.graph.node.insert(len(m.graph.node) - 1, helper.make_node("If", ["c"], ["z"], then_branch=then,
                                                                else_branch=other))
    m.graph.initializer.append(numpy_helper.from_array(np.zeros((), np.float32), "zero"))
    m.graph.output.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, None))
    del m.metadata_props[:]
    onnx.save(m, str(tmp_path / "if.onnx"))
    p = plan(tmp_path / "if.onnx", cuts=["h0"])
    assert {"h0", "m0"} <= set(p.segments[0].outputs) and {"h0", "m0"} <= set(p.segments[1].inputs)
    x = np.random.default_rng(0).standard_normal((2, 8)).astype(np.float32)
    ref = graphio.run(graphio.session(tmp_path / "if.onnx"), {"x": x})
    got = S.run_whole(tmp_path / "if.onnx", {"x": x}, cuts=["h0"])
    for k in ref:
        np.testing.assert_allclose(got[k], ref[k], rtol=1e-6)


PEAK = """
import sys, time
import numpy as np
from pathlib import Path
from stages.lib.segments import runner as S


def hwm():  # peak RSS of this process image in MiB (ru_maxrss would include the parent's, kept across exec)
    return next(int(x.split()[1]) for x in open("/proc/self/status") if x.startswith("VmHWM")) / 1024


path, mode = Path(sys.argv[1]), sys.argv[2]
x = np.random.default_rng(0).standard_normal((4, int(sys.argv[3]))).astype(np.float32)
before, t = hwm(), time.time()
if mode == "whole":
    from stages.lib.ortsession import ort_session
    ort_session(str(path), optimization="none", threads=2, arena=False).run(None, {"x": x})
else:
    S.INLINE_LIMIT = 0 if mode == "file" else None
    S.run_segmented(path, [{"x": x}] * 2, lambda seg, i, v: None)
print(hwm() - before, time.time() - t)
"""


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads VmHWM from /proc")
def test_peak_memory_is_one_layer(tmp_path: Path) -> None:
    """8 MatMul layers of 64 MiB each (512 MiB): the whole-graph session's peak RSS holds all of
    them, a segmented run's a few copies of one layer (ORT's proto, its tensor and MLAS's
    prepacked one), inline or through a temporary file; each run in a fresh process."""
    width, layers = 4096, 8
    path, _ = _chain(tmp_path / "g", layers=layers, width=width)
    layer_mb = width * width * 4 / 2**20

    def peak(mode: str) -> float:
        r = subprocess.run([sys.executable, "-c", PEAK, str(path), mode, str(width)], cwd=REPO,
                           capture_output=True, text=True, check=True)
        mb, sec = map(float, r.stdout.split())
        print(f"{mode}: peak RSS +{mb:.0f} MiB in {sec:.1f} s (one layer {layer_mb:.0f} MiB)")
        return mb

    whole = peak("whole")
    assert whole > 0.9 * layers * layer_mb
    for mode in ("inline", "file"):
        assert peak(mode) < 4.5 * layer_mb


def test_segmented_session_answers_like_a_session(tiny: dict[str, Any]) -> None:
    """What the generation loop calls (get_inputs/get_outputs/run) gives what a whole-graph
    session gives: exactly, on an FP32 export (no FP16 rounding at the cuts)."""
    from stages.lib.ortsession import ort_session
    from stages.lib.segments.session import SegmentedSession, decoder_session

    path = _export(tiny["ckpt"], tiny["root"] / "fp32", "fp32")
    whole, seg = ort_session(path, optimization="none"), SegmentedSession(path, optimization="none")
    assert [(i.name, i.type) for i in seg.get_inputs()] == [(i.name, i.type) for i in whole.get_inputs()]
    assert [o.name for o in seg.get_outputs()] == [o.name for o in whole.get_outputs()]
    feed = _feed(path, 6)
    for a, b in zip(whole.run(None, feed), seg.run(None, feed), strict=True):
        np.testing.assert_array_equal(a, b)
    logits = seg.run(["logits"], feed)
    assert len(logits) == 1 and logits[0].shape[:2] == (1, 6)
    assert isinstance(decoder_session(path, 1 << 40), SegmentedSession)  # big: block by block
    assert not isinstance(decoder_session(path, 1 << 20), SegmentedSession)
