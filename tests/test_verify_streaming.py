"""verify at sizes where a whole-graph CPU session does not fit: the decoder runs block by block
(stages/lib/segments/runner.py) for prefill parity and the teacher-forced token agreement, free-running
generation only under ``FREE_RUN_LIMIT``. On the tiny default (Qwen2.5-VL): teacher-forced
tokens equal the free-running ones for the FP32 and FP16 exports; a graph with cuts and external
data, segment by segment, gives the whole-graph figures within FP16 tolerance; a broken weight
scale drops the teacher-forced figure, fails its gate, and the drill-down (also segmented) names
the block."""

from __future__ import annotations

import importlib
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from pipeline.config import BuildConfig
from pipeline.stage import GateFailed, StageContext
from pipeline.targets import load_catalog
from stages.lib.parity import graphs as vg
from stages.lib.parity.feeds import load_specs
from stages.lib.reference_io import load_reference
from stages.lib.segments import runner as S
from stages.lib.segments.plan import plan
from tests import qdq_stage_fixtures as F
from tests.segments_decoder import _export

DEFAULT: dict[str, Any] = {"name": "t", "model": {"generate": "tiny", "family": "qwen2_5_vl"}, "targets": ["rtx4090"]}
N = 16  # the default verify.generate_tokens
LAYER = 1  # the decoder layer whose weight scale the bad graph breaks
WEIGHT = f"text_model.layers.{LAYER}.mlp.down_proj.weight_t"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The tiny checkpoint, its reference stage output, and fused FP32 / FP16 decoder exports."""
    root = tmp_path_factory.mktemp("vstream")
    ckpt = F.checkpoint(root)
    st = importlib.import_module("stages.reference").STAGE
    ref = root / "reference"
    ref.mkdir()
    st.run(StageContext(node_id="reference", params=st.params(BuildConfig.model_validate(DEFAULT), None),
                        inputs={"checkpoint": ckpt}, out=ref, target=None, external=[]))
    _, samples = load_reference(ref)
    return {"root": root, "ckpt": ckpt, "reference": ref, "samples": samples, "specs": load_specs(ckpt),
            **{dt: _export(ckpt, root / dt, dt) for dt in ("fp32", "fp16")}}


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_teacher_forced_equals_free_running(tiny: dict[str, Any], dtype: str) -> None:
    dec = tiny[dtype]
    embed = dec.parent / "embed.onnx"
    _, forced = vg.measure_decoder(dec, tiny["specs"], tiny["samples"], embed, N)
    free = vg.measure_generation(None, dec, embed, tiny["specs"], tiny["samples"], N)
    assert forced is not None
    for f, t in zip(free.per_sample, forced.per_sample, strict=True):
        assert t["tokens"] == f["tokens"] == t["reference"]  # every token, not only the share
        assert len(t["tokens"]) == N
    assert forced.figures["tokens_teacher_forced"] == free.figures["tokens"] == 1.0


def _external_copy(src: Path, dst: Path) -> Path:
    """The graph with its weights in ``decoder.onnx.data``, written as quantize writes big graphs."""
    import onnx_ir as ir

    from stages.lib.qdq import graphio

    dst.mkdir(parents=True)
    graphio.save(ir.load(src), dst / "decoder.onnx", external_above=0)
    shutil.copyfile(src.parent / "embed.onnx", dst / "embed.onnx")
    return dst / "decoder.onnx"


def test_segmented_figures_equal_whole_graph(tiny: dict[str, Any], tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """FP16 graph with cuts and every weight external, each segment written to its own folder
    (as past the proto limit), against the same graph run as one segment."""
    path = _external_copy(tiny["fp16"], tmp_path / "ext")
    assert all(t.data_location == onnx.TensorProto.EXTERNAL
               for t in onnx.load(str(path), load_external_data=False).graph.initializer if len(t.dims) == 2)
    monkeypatch.setattr(S, "INLINE_LIMIT", 0)
    assert len(plan(path).segments) == 3
    lines: list[str] = []
    args = (path, tiny["specs"], tiny["samples"], path.parent / "embed.onnx", N)
    seg, seg_tf = vg.measure_decoder(*args, report=lines.append)
    whole, whole_tf = vg.measure_decoder(*args, cuts=[], report=lines.append)
    assert lines == [f"decoder segment {k}/3 (2 samples)" for k in (1, 2, 3)]  # the whole run: one segment
    assert seg_tf is not None and whole_tf is not None
    # the residual carried across a cut is FP16, where the whole session keeps ORT's FP32 upcast
    for k, tol in (("cosine", 1e-5), ("rel_l2", 2e-4), ("norm_ratio", 1e-4), ("max_abs", 5e-3)):
        assert seg.figures[k] == pytest.approx(whole.figures[k], abs=tol), k
    assert abs(seg.figures["top1"] - whole.figures["top1"]) <= 0.02  # a near-tie of the random model may flip
    assert seg.figures["cosine"] > 0.9999 and seg.figures["finite"]
    assert seg_tf.figures == whole_tf.figures and seg_tf.figures["tokens_teacher_forced"] == seg_tf.figures["tokens"] == 1.0
    # the prompt's figures are those of a prompt-only prefill: the tokens after it do not leak back
    alone, none = vg.measure_decoder(path, tiny["specs"], tiny["samples"], cuts=[])
    assert none is None and alone.figures["cosine"] == pytest.approx(whole.figures["cosine"], abs=1e-6)


def _break_scale(src: Path, dst: Path, bad: float) -> None:
    """``WEIGHT`` as INT8 + per-channel DequantizeLinear (unscoped, as a quantizer adds it);
    ``bad`` multiplies half its channel scales."""
    dst.mkdir(parents=True)
    m = onnx.load(str(src / "decoder.onnx"))
    init = next(i for i in m.graph.initializer if i.name == WEIGHT)
    w = numpy_helper.to_array(init).astype(np.float32)
    scale = np.abs(w).max(axis=0) / 127
    q = np.clip(np.round(w / scale), -127, 127).astype(np.int8)
    scale[: len(scale) // 2] *= bad
    m.graph.initializer.remove(init)
    m.graph.initializer.extend([numpy_helper.from_array(q, WEIGHT + "_q"),
                                numpy_helper.from_array(scale.astype(np.float16), WEIGHT + "_scale")])
    m.graph.node.insert(0, helper.make_node("DequantizeLinear", [WEIGHT + "_q", WEIGHT + "_scale"], [WEIGHT], axis=1,
                                            name=f"DQ_{WEIGHT}"))
    onnx.save(m, str(dst / "decoder.onnx"))
    shutil.copyfile(src / "embed.onnx", dst / "embed.onnx")
    (dst / "quantize.json").write_text(json.dumps({"decoder": {"precision": "int8"}}))


def _verify(tiny: dict[str, Any], quantize: Path, out: Path) -> Any:
    cfg = BuildConfig.model_validate({**DEFAULT, "gates": {"int8": {"cosine": 0.99, "tokens": 0.9}}})
    t = load_catalog()["rtx4090"]
    st = importlib.import_module("stages.verify").STAGE
    (out / "engine").mkdir(parents=True)
    ctx = StageContext(node_id="verify@rtx4090", params=st.params(cfg, t), out=out / "v", target=t.model_dump(),
                       inputs={"reference": tiny["reference"], "quantize": quantize, "engine": out / "engine",
                               "checkpoint": tiny["ckpt"]}, external=[])
    ctx.out.mkdir()
    return st.run(ctx)


def test_big_graph_gates_teacher_forced_and_a_bad_scale_fails(tiny: dict[str, Any], tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Over the free-running limit (lowered to 0 here) the token gate applies to the teacher-forced
    figure and the row says why free-running generation was left to the device check."""
    monkeypatch.setattr(vg, "FREE_RUN_LIMIT", 0)
    _break_scale(tiny["fp16"].parent, tmp_path / "good", 1.0)
    res = _verify(tiny, tmp_path / "good", tmp_path / "a")
    gen = res.metrics["rows"]["generation.onnxruntime"]
    assert gen["status"] == "pass" and gen["gated_on"] == "teacher-forced, decisive positions", gen
    assert gen["tokens"] == gen["tokens_teacher_forced"] == 1.0 and "tokens_free" not in gen
    assert "vlmforge check" in gen["reason"] and any("vlmforge check" in n for n in res.notes)
    assert res.metrics["rows"]["decoder.onnxruntime"]["status"] == "pass"

    _break_scale(tiny["fp16"].parent, tmp_path / "bad", 8.0)
    with pytest.raises(GateFailed) as e:
        _verify(tiny, tmp_path / "bad", tmp_path / "b")
    m = e.value.result.metrics
    gen = m["rows"]["generation.onnxruntime"]
    assert gen["status"] == "fail" and gen["gated_on"] == "teacher-forced, decisive positions"
    assert gen["tokens"] < 0.5 and gen["tokens_teacher_forced"] < 0.5
    failed = [g for g in e.value.result.gates if not g.passed]
    assert any(g.name.startswith("generation.") and g.name.endswith(".tokens") for g in failed), failed
    assert "generation." in str(e.value) and ".tokens " in str(e.value)
    # the drill-down ran through the segment runner too, and names the broken layer
    assert m["drilldown"]["decoder"]["jump_block"] == LAYER, m["drilldown"]


def test_small_graph_reports_free_running_beside_the_gated_figure(tiny: dict[str, Any], tmp_path: Path) -> None:
    _break_scale(tiny["fp16"].parent, tmp_path / "good", 1.0)
    res = _verify(tiny, tmp_path / "good", tmp_path / "a")
    gen = res.metrics["rows"]["generation.onnxruntime"]
    assert gen["gated_on"] == "teacher-forced, decisive positions" and "reason" not in gen
    assert gen["tokens"] == gen["tokens_free"] == gen["tokens_prefix"] == gen["tokens_teacher_forced"] == 1.0
    doc = json.loads((tmp_path / "a" / "v" / "verify.json").read_text())
    row = next(r for r in doc["rows"] if r["graph"] == "generation")
    assert all(set(p) >= {"tokens", "first_divergence", "teacher_forced"} for p in row["per_sample"])


def test_teacher_forced_positions_are_the_decode_loops() -> None:
    """Positions of the tokens fed after the prompt in one pass = those the KV-cache loop gives
    them one step at a time (left padding and an M-RoPE offset included)."""
    from stages.lib.hostside import text as host

    mask = np.asarray([[0, 1, 1, 1], [1, 1, 1, 1]])
    pos = np.random.default_rng(0).integers(0, 9, size=(3, 2, 4))
    deltas = np.asarray([[3], [-1]])
    got, full = host.continue_position_ids(pos, mask, deltas, 5)
    assert got.shape == (3, 2, 9) and np.array_equal(got[..., :4], pos) and full.shape == (2, 9)
    m = mask
    for j in range(5):
        m = host.extend_attention_mask(m, 1)
        np.testing.assert_array_equal(got[..., 4 + j: 5 + j], host.decode_position_ids(m, deltas, 1))
    same, m0 = host.continue_position_ids(pos, mask, deltas, 0)
    assert np.array_equal(same, pos) and np.array_equal(m0, mask)
