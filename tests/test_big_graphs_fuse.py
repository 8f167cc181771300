"""What fuse writes for graphs with external data, up to past protobuf's 2 GB
(``stages.fuse.fuse_graph`` and the fuse stage).

Every saved graph must be whole in its own folder: its external data written beside it (or every
tensor inline), never pointing at the folder it was read from. The slow test uses the real sizes
of the issue (a 151936-token vocabulary at hidden 4096 in FP16: a 1.24 GB embedding Gather and a
1.24 GB lm_head MatMul, 2.49 GB in all); the fast ones force the same code paths on a tiny graph
with the external-data threshold. The graph and the checks: tests/big_graph.py.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import onnx
import pytest

from stages.fuse import fuse_graph
from stages.lib.qdq import graphio, model_tensors
from tests.big_graph import FUSE_PARAMS, H_REAL, V_REAL, BigGraph, _move_away, assert_whole

# ---- fast: tiny graphs, the external-data paths forced by the threshold --------------------------


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


# ---- slow: the real sizes (2.49 GB of FP16 weights) ---------------------------------------------


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
