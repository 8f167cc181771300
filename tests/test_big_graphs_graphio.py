"""What calibrate and quantize load, save, check and run for graphs with external data, up to past
protobuf's 2 GB (``stages.lib.qdq.graphio``, ``stages.lib.qdq.model_tensors``).

Every saved graph must be whole in its own folder: its external data written beside it (or every
tensor inline), never pointing at the folder it was read from. The slow test uses the real sizes
of the issue (2.49 GB of FP16 weights); the fast ones force the same code paths on a tiny graph
with the external-data threshold and a tiny proto limit. The graph and the checks:
tests/big_graph.py.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto

from stages.lib.qdq import calibrators as C
from stages.lib.qdq import graphio, model_tensors
from tests.big_graph import H_REAL, IDS, V_REAL, BigGraph, _move_away, assert_whole

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
