"""Graphs with external data, up to past protobuf's 2 GB: what fuse writes and what calibrate and
quantize load, save, check and run (``stages.fuse.fuse_graph``, ``stages.lib.qdq.graphio``).

Every saved graph must be whole in its own folder: its external data written beside it (or every
tensor inline), never pointing at the folder it was read from. The slow tests use the real sizes
of the issue (a 151936-token vocabulary at hidden 4096 in FP16: a 1.24 GB embedding Gather and a
1.24 GB lm_head MatMul, 2.49 GB in all); the fast ones force the same code paths on a tiny graph
with the external-data threshold.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from stages.fuse import fuse_graph
from stages.lib.qdq import calibrators as C
from stages.lib.qdq import graphio, model_tensors

FUSE_PARAMS = {"fold_batchnorm": True, "attention": "auto", "cleanup": True, "opset": 19}
TILE_E, TILE_W = 1024, 64  # rows of the repeated random tiles the weights are written from
IDS = np.array([[0, 1, 2, 3, 1029]], np.int64)


class BigGraph:
    """``input_ids`` -> Gather(embed [V, H]) -> Mul(0.5 + 0.5, folded by cleanup) -> MatMul(lm_head
    [H, V]) -> Add(bias [V], inline) -> ``logits``, FP16. The two weights are written to
    ``<name>.data`` tile by tile (one tile in memory, never the whole table); the reference output
    is computed from the tiles."""

    def __init__(self, folder: Path, vocab: int, hidden: int, name: str = "decoder.onnx", seed: int = 0):
        self.path = folder / name
        folder.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(seed)
        self.te = min(TILE_E, vocab)
        self.tw = min(TILE_W, hidden)
        assert hidden % self.tw == 0
        self.tile_e = rng.uniform(-1, 1, (self.te, hidden)).astype(np.float16)
        self.tile_w = rng.uniform(-0.02, 0.02, (self.tw, vocab)).astype(np.float16)
        self.bias = rng.uniform(-0.1, 0.1, vocab).astype(np.float16)
        data = name + ".data"
        inits, offset = [], 0
        with open(folder / data, "wb") as f:
            for wname, shape, tile in (("embed", (vocab, hidden), self.tile_e), ("lm_head", (hidden, vocab), self.tile_w)):
                length = shape[0] * shape[1] * 2
                written = 0
                while written < length:
                    chunk = tile[: (length - written) // (tile.shape[1] * 2)]
                    f.write(chunk.tobytes())
                    written += chunk.nbytes
                inits.append(_external(wname, shape, data, offset, length))
                offset += length
                pad = -offset % 65536  # 64 KiB-aligned, as exporters lay out large tensors
                f.write(b"\0" * pad)
                offset += pad
        inits.append(numpy_helper.from_array(self.bias, "bias"))
        half = helper.make_tensor("half", TensorProto.FLOAT16, [], [0.5])
        nodes = [
            helper.make_node("Gather", ["embed", "input_ids"], ["h"], axis=0, name="/embed/Gather"),
            helper.make_node("Constant", [], ["c0"], value=half, name="/c0"),
            helper.make_node("Constant", [], ["c1"], value=half, name="/c1"),
            helper.make_node("Add", ["c0", "c1"], ["one"], name="/one"),
            helper.make_node("Mul", ["h", "one"], ["h1"], name="/scale"),
            helper.make_node("MatMul", ["h1", "lm_head"], ["mm"], name="/lm_head/MatMul"),
            helper.make_node("Add", ["mm", "bias"], ["logits"], name="/lm_head/Add"),
        ]
        g = helper.make_graph(nodes, "big", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT16, ["batch", "seq", vocab])], inits)
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 19)])
        m.ir_version = 10
        onnx.save_model(m, str(self.path))  # the proto itself is small: the weights are already in the file

    def reference(self, ids: np.ndarray) -> np.ndarray:
        h = self.tile_e[ids % self.te].astype(np.float32)  # embed row r is tile_e[r % te]
        # lm_head row k is tile_w[k % tw]: h @ lm_head = (h folded onto tw rows) @ tile_w
        folded = h.reshape(*h.shape[:-1], -1, self.tw).sum(-2)
        return folded @ self.tile_w.astype(np.float32) + self.bias.astype(np.float32)


def _external(name: str, shape: tuple[int, int], location: str, offset: int, length: int) -> TensorProto:
    t = TensorProto(name=name, data_type=TensorProto.FLOAT16, dims=list(shape), data_location=TensorProto.EXTERNAL)
    for k, v in (("location", location), ("offset", str(offset)), ("length", str(length))):
        e = t.external_data.add()
        e.key, e.value = k, v
    return t


def assert_whole(path: Path, external: bool, big: BigGraph | None = None) -> None:
    """``path`` loads from its own folder alone (onnx-ir, onnx with its data, onnx.checker by path,
    an ORT session running one inference); external data, when expected, lies beside it."""
    folder = path.parent
    bare = onnx.load(str(path), load_external_data=False)
    ext = [t for t in bare.graph.initializer if t.data_location == TensorProto.EXTERNAL]
    if external:
        assert ext, "expected the weights in external data"
        for t in ext:
            info = {e.key: e.value for e in t.external_data}
            data = folder / info["location"]
            assert info["location"] == path.name + ".data" and data.is_file(), info
            assert int(info.get("offset", 0)) + int(info["length"]) <= data.stat().st_size
    else:
        assert not ext, f"inline graph still points at external data: {[t.name for t in ext]}"
    del bare
    onnx.checker.check_model(str(path), full_check=True)
    model = ir.load(path)
    for v in model.graph.initializers.values():
        assert v.const_value is not None
        arr = v.const_value.numpy()
        assert arr.size == 0 or np.isfinite(arr.reshape(-1)[:16].astype(np.float32)).all()
    del model, arr
    full = onnx.load(str(path), load_external_data=True)
    assert all(t.data_location != TensorProto.EXTERNAL for t in full.graph.initializer)
    del full
    sess = graphio.session(path)
    (logits,) = sess.run(None, {"input_ids": IDS})
    del sess
    if big is not None:
        ref = big.reference(IDS)
        assert logits.shape == ref.shape
        np.testing.assert_allclose(logits.astype(np.float32), ref, atol=2e-2 * max(1.0, float(np.abs(ref).max())))


def _move_away(folder: Path, to: Path) -> Path:
    """Rename a written folder, so a graph still pointing at its old location fails to load."""
    shutil.move(str(folder), str(to))
    return to


# ---- fast: tiny graphs, the external-data paths forced by the threshold --------------------------


def test_tensor_bytes_from_tensors_not_bytesize(tmp_path: Path) -> None:
    big = BigGraph(tmp_path / "src", vocab=256, hidden=64)
    want = 2 * 256 * 64 * 2 + 256 * 2 + 2 * 2  # embed, lm_head, bias, two scalar Constants
    bare = onnx.load(str(big.path), load_external_data=False)
    assert model_tensors.tensor_bytes(bare) == want  # external tensors counted from their dims
    assert model_tensors.tensor_bytes(ir.load(big.path)) == want
    assert model_tensors.tensor_bytes(graphio.load_proto(big.path)) == want
    assert model_tensors.fits_in_proto(bare)


@pytest.mark.parametrize("external_above", [0, None], ids=["external", "inline"])
def test_fuse_graph_writes_a_whole_graph(tmp_path: Path, external_above: int | None) -> None:
    """The bug: a fused graph under 2 GB loaded with external data pointed at data it never wrote."""
    big = BigGraph(tmp_path / "export", vocab=2048, hidden=64)
    dst = tmp_path / "fuse" / "decoder.onnx"
    dst.parent.mkdir()
    entry = fuse_graph(big.path, dst, FUSE_PARAMS, {}, seed=0, external_above=external_above)
    assert entry["check"]["max_abs"] <= entry["check"]["tolerance"]
    assert entry["ops_after"].get("Constant", 0) == 0  # cleanup ran (folded 0.5 + 0.5)
    shutil.rmtree(tmp_path / "export")  # the source folder is gone: nothing may point into it
    moved = _move_away(tmp_path / "fuse", tmp_path / "elsewhere")
    assert_whole(moved / "decoder.onnx", external=external_above == 0, big=big)
    assert (moved / "decoder.onnx.data").exists() == (external_above == 0)


@pytest.mark.parametrize("threshold", [0, None], ids=["external", "inline"])
def test_fuse_stage_outputs_are_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, threshold: int | None) -> None:
    """The whole stage on exports whose graphs all have external data (as a real model's have):
    vision/decoder re-saved whole, embed.onnx copied through with its data."""
    from pipeline.config import BuildConfig
    from pipeline.stage import StageContext
    from stages.fuse import STAGE

    if threshold is not None:
        monkeypatch.setattr(graphio, "EXTERNAL_DATA_BYTES", threshold)
    vis, dec = tmp_path / "export_vision", tmp_path / "export_decoder"
    graphs = {"vision": BigGraph(vis, 2048, 64, "vision.onnx"), "decoder": BigGraph(dec, 3072, 128, "decoder.onnx", seed=1),
              "embed": BigGraph(dec, 2048, 32, "embed.onnx", seed=2)}
    cfg = BuildConfig.model_validate({"name": "t", "model": {"generate": "cnn-tiny"}, "targets": ["rtx4090"]})
    out = tmp_path / "fuse"
    STAGE.run(StageContext(node_id="fuse", params=STAGE.params(cfg, None), inputs={"export_vision": vis,
                           "export_decoder": dec}, out=out, target=None, external=[]))
    shutil.rmtree(vis)
    shutil.rmtree(dec)
    moved = _move_away(out, tmp_path / "elsewhere")
    for name, big in graphs.items():
        assert_whole(moved / f"{name}.onnx", external=name == "embed" or threshold == 0, big=big)


@pytest.mark.parametrize("external_above", [0, None], ids=["external", "inline"])
def test_graphio_save_check_session(tmp_path: Path, external_above: int | None) -> None:
    """What calibrate and quantize do: load (weights in memory), collect through an ORT session,
    check, save; and the same on an onnx-ir model whose weights are still external."""
    big = BigGraph(tmp_path / "fuse", vocab=2048, hidden=64)
    model = graphio.load(big.path)
    assert not model_tensors.has_external(model)
    col, sess = C.make_collector(model)
    out = graphio.run(sess, {"input_ids": IDS}, col.names)
    col.update(out)
    assert col.samples == 1 and "logits" in out
    graphio.check(model)
    dst = tmp_path / "quantize" / "decoder.onnx"
    dst.parent.mkdir()
    kw = {} if external_above is None else {"external_above": external_above}
    graphio.save(model, dst, **kw)

    lazy = ir.load(big.path)  # ExternalTensors into the source folder
    assert model_tensors.has_external(lazy)
    graphio.check(lazy)
    np.testing.assert_allclose(graphio.run(graphio.session(lazy), {"input_ids": IDS})["logits"].astype(np.float32),
                               big.reference(IDS), atol=2e-2)
    dst2 = tmp_path / "quantize" / "lazy.onnx"
    graphio.save(lazy, dst2, **kw)
    assert model_tensors.has_external(lazy)  # the caller's model is left as it was
    del lazy
    shutil.rmtree(tmp_path / "fuse")
    moved = _move_away(tmp_path / "quantize", tmp_path / "elsewhere")
    for name in ("decoder.onnx", "lazy.onnx"):
        assert_whole(moved / name, external=external_above == 0, big=big)


def test_past_the_proto_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Past the limit (forced here with a tiny one): load keeps the weights memory-mapped in their
    file, load_proto infers types on the weight-less graph and reads the weights in, and
    session/check/ort_run go through a temporary file with external data."""
    from stages.lib.fusion.check import ort_run

    big = BigGraph(tmp_path / "fuse", vocab=2048, hidden=64)
    monkeypatch.setattr(model_tensors, "PROTO_LIMIT", 1024)
    proto = graphio.load_proto(big.path)
    assert not model_tensors.fits_in_proto(proto)
    assert any(v.name == "h1" for v in proto.graph.value_info)  # types inferred
    assert all(t.data_location != TensorProto.EXTERNAL for t in proto.graph.initializer)  # weights read in

    spilled: list[Path] = []
    real = graphio.spilled.__enter__

    def spy(self: graphio.spilled) -> Path:
        spilled.append(real(self))
        return spilled[-1]

    monkeypatch.setattr(graphio.spilled, "__enter__", spy)
    ref = big.reference(IDS)
    got = graphio.run(graphio.session(proto), {"input_ids": IDS})["logits"]
    np.testing.assert_allclose(got.astype(np.float32), ref, atol=2e-2)
    graphio.check(proto)
    (got2,) = ort_run(proto, {"input_ids": IDS})
    np.testing.assert_allclose(got2.astype(np.float32), ref, atol=2e-2)
    assert len(spilled) == 3

    model = graphio.load(big.path)  # calibrate's load: weights stay in decoder.onnx.data
    ext = [v.const_value for v in model.graph.initializers.values() if isinstance(v.const_value, ir.ExternalTensor)]
    assert {t.name for t in ext} == {"embed", "lm_head"} and all(Path(t.path).is_absolute() for t in ext)
    assert model.graph.initializers["embed"].const_value is not None
    assert any(v.type is not None for n in model.graph for v in n.outputs)  # typed values
    col, sess = C.make_collector(model)
    out = graphio.run(sess, {"input_ids": IDS}, col.names)
    np.testing.assert_allclose(out["logits"].astype(np.float32), ref, atol=2e-2)
    graphio.check(model)
    dst = tmp_path / "quantize" / "decoder.onnx"
    dst.parent.mkdir()
    graphio.save(model, dst)  # under 256 MiB: inline, read from the mapped file
    graphio.save(model, dst.with_name("forced.onnx"), external_above=0)
    assert len(spilled) == 5 and not any(p.exists() for p in spilled)  # temporary copies, removed
    del model, sess
    monkeypatch.undo()
    shutil.rmtree(tmp_path / "fuse")
    moved = _move_away(tmp_path / "quantize", tmp_path / "elsewhere")
    assert_whole(moved / "decoder.onnx", external=False, big=big)
    assert_whole(moved / "forced.onnx", external=True, big=big)


# ---- slow: the real sizes (2.49 GB of FP16 weights) ---------------------------------------------

V_REAL, H_REAL = 151936, 4096


@pytest.mark.slow
def test_fuse_graph_past_2gb(tmp_path: Path) -> None:
    """fuse's path on a 2.49 GB graph: rules, save (external data written beside), ORT check."""
    big = BigGraph(tmp_path / "export", vocab=V_REAL, hidden=H_REAL)
    assert model_tensors.tensor_bytes(onnx.load(str(big.path), load_external_data=False)) > 2**31
    dst = tmp_path / "fuse" / "decoder.onnx"
    dst.parent.mkdir()
    entry = fuse_graph(big.path, dst, FUSE_PARAMS, {}, seed=0)
    assert entry["check"]["max_abs"] <= entry["check"]["tolerance"]
    shutil.rmtree(tmp_path / "export")
    moved = _move_away(tmp_path / "fuse", tmp_path / "elsewhere")
    assert_whole(moved / "decoder.onnx", external=True, big=big)


@pytest.mark.slow
def test_graphio_past_2gb(tmp_path: Path) -> None:
    """calibrate's path (load, collector session, run) and quantize's (load_proto, session, check,
    save) on a 2.49 GB graph."""
    big = BigGraph(tmp_path / "fuse", vocab=V_REAL, hidden=H_REAL)
    model = graphio.load(big.path)
    assert not model_tensors.fits_in_proto(model) and model_tensors.has_external(model)  # weights left mapped in the file
    col, sess = C.make_collector(model)
    out = graphio.run(sess, {"input_ids": IDS}, col.names)
    np.testing.assert_allclose(out["logits"].astype(np.float32), big.reference(IDS), atol=2e-2)
    col.update(out)
    del sess, out
    graphio.check(model)
    dst = tmp_path / "quantize" / "decoder.onnx"
    dst.parent.mkdir()
    graphio.save(model, dst)
    del model
    proto = graphio.load_proto(big.path)
    np.testing.assert_allclose(graphio.run(graphio.session(proto), {"input_ids": IDS})["logits"].astype(np.float32),
                               big.reference(IDS), atol=2e-2)
    del proto
    shutil.rmtree(tmp_path / "fuse")
    moved = _move_away(tmp_path / "quantize", tmp_path / "elsewhere")
    assert_whole(moved / "decoder.onnx", external=True, big=big)
