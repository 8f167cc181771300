"""Calibration on the segment runner (the calibrate stage, ``stages.lib.segments.runner``): a
decoder calibrated segment by segment equals a whole-graph calibration (exactly on an FP32
stand-in; within FP16 rounding past the first cut on the tiny default's real decoder, from
tests/segments_decoder.py), and a NaN in a later segment names the sample and the layer.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

from stages.lib.segments.cuts import CUTS_KEY, read_cuts
from stages.lib.segments.plan import plan
from tests import qdq_stage_fixtures as F
from tests.segments_decoder import tiny_decoder


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return F.checkpoint(tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The tiny default (FP16) decoder, exported and fused: two layers, so three segments."""
    return tiny_decoder(tmp_path_factory)


def _calibrate(ckpt: Path, fuse: Path, out: Path) -> list[str]:
    from pipeline.config import BuildConfig
    from pipeline.stage import StageContext
    from stages.calibrate import STAGE

    cal = {"samples": 3, "prompt_len": 20, "image_sizes": [[112, 112], [140, 168]]}
    cfg = BuildConfig.model_validate({"name": "t", "model": {"generate": "tiny", "family": "qwen2_5_vl"},
                                      "targets": ["rtx4090"], "calibration": cal})
    out.mkdir(parents=True)
    lines: list[str] = []
    ctx = StageContext(node_id="calibrate", params=STAGE.params(cfg, None), inputs={"fuse": fuse, "checkpoint": ckpt},
                       out=out, target=None, external=[], progress=lambda m, f: lines.append(m))
    STAGE.run(ctx)
    return [x for x in lines if x.startswith("decoder segment")]


def _results(out: Path, g: str) -> tuple[dict[str, Any], dict[str, np.ndarray], dict[str, np.ndarray]]:
    z, f = np.load(out / f"ranges_{g}.npz"), np.load(out / f"feeds_{g}.npz")
    return (json.loads((out / f"ranges_{g}.json").read_text()), {k: z[k] for k in z.files},
            {k: f[k] for k in f.files})


def _set_cuts(path: Path, cuts: list[str] | None) -> None:
    """Record ``cuts`` (None: drop the cut list and the name scopes it could be derived from)."""
    m = onnx.load(str(path))
    del m.metadata_props[:]
    if cuts is None:
        for node in m.graph.node:
            del node.metadata_props[:]
    else:
        m.metadata_props.add(key=CUTS_KEY, value=json.dumps(cuts))
    onnx.save(m, str(path))


def test_sequential_calibration_equals_whole_graph_fp32(ckpt: Path, tmp_path: Path) -> None:
    """FP32 stand-in decoder cut in three: the very same ranges, histograms and feeds."""
    cut = F.fuse_folder(tmp_path / "cut", 3 * 2 * 14 * 14, dtype=np.float32)
    whole = F.fuse_folder(tmp_path / "whole", 3 * 2 * 14 * 14, dtype=np.float32)
    _set_cuts(cut / "decoder.onnx", ["u", "x1"])
    assert _calibrate(ckpt, cut, tmp_path / "a") == [f"decoder segment {k}/3 (3 samples)" for k in (1, 2, 3)]
    assert _calibrate(ckpt, whole, tmp_path / "b") == ["decoder segment 1/1 (3 samples)"]
    for g in ("vision", "decoder"):
        (ja, za, fa), (jb, zb, fb) = _results(tmp_path / "a", g), _results(tmp_path / "b", g)
        assert json.dumps(ja) == json.dumps(jb)  # same values, same key order
        assert za.keys() == zb.keys() and all(np.array_equal(za[k], zb[k]) for k in za)
        assert fa.keys() == fb.keys() and all(np.array_equal(fa[k], fb[k]) for k in fa)


def test_sequential_calibration_of_the_tiny_decoder(tiny: dict[str, Any], tmp_path: Path) -> None:
    """The real FP16 decoder, cut after each layer, against the same graph run whole: the first
    segment's tensors are identical; later ones differ by FP16 rounding (the value carried over a
    cut is the graph's FP16 tensor, where the whole-graph session keeps ORT's FP32 upcast)."""
    folders = {}
    for name, cuts in (("cut", read_cuts(onnx.load(str(tiny["fp16"]), load_external_data=False))), ("whole", None)):
        folders[name] = F.fuse_folder(tmp_path / name, 3 * 2 * 14 * 14)
        for f in ("decoder.onnx", "embed.onnx"):
            shutil.copyfile(tiny["fp16"].parent / f, folders[name] / f)
        _set_cuts(folders[name] / "decoder.onnx", cuts)
    assert len(_calibrate(tiny["ckpt"], folders["cut"], tmp_path / "a")) == 3
    assert len(_calibrate(tiny["ckpt"], folders["whole"], tmp_path / "b")) == 1
    first = plan(tiny["fp16"]).segments[0]
    in_first = {o for i in first.nodes for o in plan(tiny["fp16"]).proto.graph.node[i].output} | set(first.inputs)
    (ja, za, fa), (jb, zb, fb) = _results(tmp_path / "a", "decoder"), _results(tmp_path / "b", "decoder")
    assert {k: v for k, v in ja.items() if k != "tensors"} == {k: v for k, v in jb.items() if k != "tensors"}
    assert list(ja["tensors"]) == list(jb["tensors"]) == ja["order"]
    assert za.keys() == zb.keys() and fa.keys() == fb.keys() and all(np.array_equal(fa[k], fb[k]) for k in fa)
    for i, name in enumerate(ja["order"]):
        ta, tb = ja["tensors"][name], jb["tensors"][name]
        if name in in_first:
            assert ta == tb and np.array_equal(za[f"hist_{i}"], zb[f"hist_{i}"]), name
            continue
        assert ta["shape"] == tb["shape"] and ta["producer"] == tb["producer"], name
        for key in ("amax", "amax_fp8", "max_abs", "min", "max"):
            assert ta[key] == pytest.approx(tb[key], rel=1e-3, abs=1e-3), (name, key)
        assert za[f"hist_{i}"].sum() == zb[f"hist_{i}"].sum()
        assert float(za[f"width_{i}"]) == pytest.approx(float(zb[f"width_{i}"]), rel=1e-3)


def test_nan_in_a_later_segment_names_sample_and_layer(ckpt: Path, tmp_path: Path) -> None:
    from pipeline.stage import StageError

    bad = F.fuse_folder(tmp_path / "bad", 3 * 2 * 14 * 14, nan_at="decoder")
    _set_cuts(bad / "decoder.onnx", ["x1"])  # the Log that makes the NaN is in the second segment
    with pytest.raises(StageError, match=r"synthetic-0: NaN/Inf .*decoder\.onnx; first NaN/Inf at tensor 'l0', "
                                         r"output of node /bad/log \(Log\)"):
        _calibrate(ckpt, bad, tmp_path / "out")
