"""The quantize stage: per-target precision, shared keys, quantize.json, parity, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest

from pipeline.config import BuildConfig
from pipeline.stage import GateFailed, StageContext, StageError
from pipeline.targets import load_catalog
from stages import calibrate, quantize
from tests import qdq_stage_fixtures as F

PATCH_DIM = 3 * 2 * 14 * 14
CAT = load_catalog()


def _cfg(**over) -> BuildConfig:
    base = {"name": "t", "model": {"generate": "tiny", "family": "qwen2_5_vl"}, "targets": ["rtx4090"],
            "calibration": {"samples": 2, "image_sizes": [[112, 112]], "prompt_len": 20}}
    return BuildConfig.model_validate({**base, **over})


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    root = tmp_path_factory.mktemp("q")
    ck = F.checkpoint(root)
    fz = F.fuse_folder(root, PATCH_DIM)
    cal = root / "calibrate"
    cal.mkdir()
    cfg = _cfg()
    calibrate.STAGE.run(StageContext("calibrate", calibrate.STAGE.params(cfg, None), {"fuse": fz, "checkpoint": ck},
                                     cal, None, []))
    return {"fuse": fz, "calibrate": cal, "checkpoint": ck, "reference": F.reference_folder(root, ck, fz)}


def _run(cfg, target, upstream, out: Path):
    out.mkdir(parents=True, exist_ok=True)
    t = CAT[target]
    ctx = StageContext(f"quantize@{target}", quantize.STAGE.params(cfg, t), upstream, out, t.model_dump(), [])
    return quantize.STAGE.run(ctx), json.loads((out / "quantize.json").read_text())


def test_declaration_and_shared_keys():
    s = quantize.STAGE
    assert s.per_target and not s.key_uses_target and set(s.deps) >= {"fuse", "calibrate", "checkpoint"}
    cfg = _cfg()
    assert s.params(cfg, CAT["rtx4090"]) == s.params(cfg, CAT["rtx5090"])  # both resolve to fp8
    assert s.params(cfg, CAT["rtx3090"])["precision"] == {"vision": "int8", "decoder": "int8"}
    assert s.params(cfg, CAT["rtx4090"]) != s.params(cfg, CAT["rtx3090"])


@pytest.mark.parametrize("target,mode", [("rtx3090", "int8"), ("rtx4090", "fp8")])
def test_best_precision_graphs(upstream, tmp_path, target, mode):
    res, q = _run(_cfg(), target, upstream, tmp_path)
    for g in ("vision", "decoder"):
        e = q[g]
        assert e["precision"] == mode and e["qdq_pairs"] > 0 and e["checker"] is True
        assert 0.0 < e["weights"]["share"] <= 1.0
        if mode == "fp8" and g == "vision":  # the pixel-reading layer stays high precision in FP8
            assert e["kept_high_precision"][0]["node"] == "/visual/merger/mlp.0/MatMul"
        else:
            assert e["weights"]["share"] == 1.0
        assert e["parity"]["vs_unquantized"]["cosine"] > 0.98
        m = onnx.load(str(tmp_path / f"{g}.onnx"))
        onnx.checker.check_model(m, full_check=True)
        want = onnx.TensorProto.FLOAT8E4M3FN if mode == "fp8" else onnx.TensorProto.INT8
        assert any(i.data_type == want for i in m.graph.initializer)
    assert "top1" in q["decoder"]["parity"]["vs_unquantized"]
    assert (tmp_path / "embed.onnx").is_file() and (tmp_path / "vision.json").is_file()
    assert res.gates and all(g.passed for g in res.gates)


def test_no_session_over_a_whole_graph(upstream, tmp_path, monkeypatch):
    """Every run goes through the block runner (a decoder past memory cannot open whole), and
    the candidates' folders are gone afterwards."""
    from stages.lib.qdq import graphio

    def refuse(*a, **kw):
        raise AssertionError("quantize opened a whole-graph session")

    monkeypatch.setattr(graphio, "session", refuse)
    _, q = _run(_cfg(), "rtx3090", upstream, tmp_path)
    assert q["decoder"]["runner"] == "whole"  # the stand-in records no cuts: one segment
    assert {"decoder.onnx", "vision.onnx", "quantize.json"} <= {p.name for p in tmp_path.iterdir()}
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no candidate left


def test_mixed_per_graph_and_keep_patterns(upstream, tmp_path):
    cfg = _cfg(precision={"vision": "fp16", "decoder": "int4-weight"},
               quantize={"decoder": {"keep_high_precision": ["*up_proj*"], "int4_block": 64}})
    _, q = _run(cfg, "rtx4090", upstream, tmp_path)
    assert q["vision"]["copied"] and q["vision"]["qdq_pairs"] == 0
    d = q["decoder"]
    assert d["precision"] == "int4-weight" and d["opset"] == 21 and d["qdq_pairs"] == 0
    kept = {k["node"]: k["why"] for k in d["kept_high_precision"]}
    assert "up_proj" in kept["/model/layers.0/mlp/up_proj/MatMul"]
    assert "lm_head" in kept["/lm_head/MatMul"]  # excluded by default in int4
    assert d["weight_dq"] == 1 and d["parity"]["vs_unquantized"]["cosine"] > 0.98
    a = d["int4_awq"]  # AWQ kept only where it measures better on calibration feeds
    assert a["chosen"] == ("awq" if a["awq"] >= a["plain"] else "plain") and a["inputs"] == "calibration"


def test_accuracy_budget_triggers_fallback(upstream, tmp_path):
    cfg = _cfg(precision={"vision": "fp16", "decoder": "int8"},
               quantize={"decoder": {"accuracy_budget": 0.99999}})
    _, q = _run(cfg, "rtx3090", upstream, tmp_path)
    s = q["decoder"]["sensitivity"]
    assert s["budget"] == 0.99999 and len(s["ranking"]) >= 2
    assert q["decoder"]["sensitivity_inputs"] == "calibration"  # held-out data only grades
    assert s["met"] == (s["score_final"] >= 0.99999)
    if s["score_full"] < 0.99999:
        assert q["decoder"]["kept_high_precision"] and "sensitivity" in q["decoder"]["kept_high_precision"][0]["why"]


def test_int4_on_graph_without_matmul_weights_names_graph(upstream, tmp_path):
    import shutil

    from onnx import TensorProto, helper

    fz = tmp_path / "fz"
    shutil.copytree(upstream["fuse"], fz)
    g = helper.make_graph([helper.make_node("Relu", ["pixel_values"], ["image_features"], name="relu")], "v",
                          [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT16, ["n", PATCH_DIM])],
                          [helper.make_tensor_value_info("image_features", TensorProto.FLOAT16, ["n", PATCH_DIM])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 19)])
    m.ir_version = 10
    onnx.save(m, str(fz / "vision.onnx"))
    cfg = _cfg(precision={"vision": "int4-weight", "decoder": "fp16"})
    with pytest.raises(StageError, match=r"vision\.onnx cannot take int4-weight"):
        _run(cfg, "rtx4090", {**upstream, "fuse": fz}, tmp_path / "out")


def test_gate_failure_is_raised(upstream, tmp_path):
    """accuracy_budget off: no fallback, the gate fails the build."""
    cfg = _cfg(precision={"vision": "fp16", "decoder": "int8"}, gates={"int8": {"cosine": 1.0, "norm_ratio": None}},
               quantize={"decoder": {"accuracy_budget": "off"}})
    with pytest.raises(GateFailed, match="decoder.int8.cosine"):
        _run(cfg, "rtx3090", upstream, tmp_path)


def test_default_budget_falls_back_to_meet_the_gate(upstream, tmp_path):
    """By default the fallback aims inside the gate: a gate the fully quantized graph misses is met
    by keeping the most harmful groups high precision, and the report says which."""
    from stages.lib.qdq.sensitivity import search_budget

    gate = 0.9999
    cfg = _cfg(precision={"vision": "fp16", "decoder": "int8"}, gates={"int8": {"cosine": gate, "norm_ratio": None}})
    _, q = _run(cfg, "rtx3090", upstream, tmp_path)
    s = q["decoder"]["sensitivity"]
    assert s["budget"] == pytest.approx(search_budget("gate", {"cosine": gate})) and s["budget"] > gate
    assert s["score_full"] < gate  # the premise: everything quantized misses this gate
    assert s["met"] and q["decoder"]["kept_high_precision"] and s["walk"][0] == {"kept_groups": 0, "score": s["score_full"]}
    par = q["decoder"]["parity"]
    assert par.get("vs_reference", par["vs_unquantized"])["cosine"] >= gate  # what the gate read (no GateFailed)


def test_vision_only_cnn_model(tmp_path):
    """A CNN / bring-your-own vision graph: no decoder, image preprocessing from vision.json."""
    import numpy as np

    from tests import qdq_graphs as G

    fz = tmp_path / "fuse"
    fz.mkdir()
    m = G.conv_bn_relu_pool()
    m.graph.input[0].name = "pixel_values"
    m.graph.node[0].input[0] = "pixel_values"
    onnx.save(m, str(fz / "vision.onnx"))
    (fz / "vision.json").write_text(json.dumps({"preprocess": {"input_name": "pixel_values", "layout": "NCHW",
                                                                "resize": [16, 16]}}))
    ref = tmp_path / "reference"
    ref.mkdir()
    rng = np.random.default_rng(5)
    np.savez(ref / "reference.npz", **{f"s{i}.image": (rng.random((20, 24, 3)) * 255).astype(np.uint8) for i in range(2)})
    (ref / "reference.json").write_text(json.dumps({"samples": [{}, {}]}))
    cal = tmp_path / "calibrate"
    cal.mkdir()
    cfg = _cfg(precision={"vision": "int8", "decoder": "int8"})
    res = calibrate.STAGE.run(StageContext("calibrate", calibrate.STAGE.params(cfg, None),
                                           {"fuse": fz, "checkpoint": tmp_path}, cal, None, []))
    assert "decoder_tensors" not in res.metrics and (cal / "ranges_vision.json").is_file()
    up = {"fuse": fz, "calibrate": cal, "checkpoint": tmp_path, "reference": ref}
    _, q = _run(cfg, "rtx3090", up, tmp_path / "q")
    assert list(q) == ["vision"] and q["vision"]["qdq_pairs"] == 2 and q["vision"]["weight_dq"] == 2
    assert q["vision"]["parity"]["vs_unquantized"]["cosine"] > 0.99


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_real_exported_graphs_end_to_end(tmp_path, family):
    """checkpoint → exports → fuse → reference → calibrate → quantize (int8, fp8, int4-weight)."""
    import shutil

    cfg = BuildConfig.model_validate({"name": "e2e", "model": {"generate": "tiny", "family": family},
                                      "targets": ["rtx4090"], "calibration": {"samples": 3}})
    work = tmp_path / "w"

    def stage(name: str, target=None, cfg=cfg):
        return F.run_stage(work, cfg, name, target)

    for name in ("checkpoint", "export_vision", "export_decoder"):
        stage(name)
    try:
        stage("fuse")
    except StageError:  # fusion is another stage's concern: quantize the exported graphs then
        for d in ("export_vision", "export_decoder"):
            for f in (work / d).iterdir():
                shutil.copy2(f, work / "fuse" / f.name)
    stage("reference")
    stage("calibrate")
    for target, prec in (("rtx3090", {"vision": "int8", "decoder": "int8"}),
                         ("rtx4090", {"vision": "fp8", "decoder": "int4-weight"})):
        c = cfg.model_copy(update={"precision": cfg.precision.model_copy(update=prec),
                                   "gates": {**cfg.gates, "int4-weight": cfg.gates["int4-weight"].model_copy(
                                       update={"cosine": 0.5})}})
        stage("quantize", CAT[target], cfg=c)
        q = json.loads((work / f"quantize@{target}" / "quantize.json").read_text())
        for g in ("vision", "decoder"):
            assert q[g]["precision"] == prec[g] and q[g]["checker"] is True
            assert q[g]["parity"]["vs_reference"]["cosine"] > (0.9 if prec[g] == "int4-weight" else 0.98)
            onnx.checker.check_model(str(work / f"quantize@{target}" / f"{g}.onnx"), full_check=True)


def test_a_vision_only_models_key_holds_no_decoder_setting() -> None:
    """Issue 13: the unused precision.decoder: best (int8 on rtx3090, fp8 on rtx4090) no longer
    splits the quantize key of a vision-only model whose vision graphs are the same."""
    cat = load_catalog()
    for model, same in (({"generate": "cnn-tiny"}, True), ({"generate": "tiny", "family": "qwen2_5_vl"}, False)):
        cfg = BuildConfig.model_validate({"name": "k", "model": model, "targets": ["rtx3090", "rtx4090"],
                                          "precision": {"vision": "int8"}})
        a, b = (quantize.STAGE.params(cfg, cat[t]) for t in ("rtx3090", "rtx4090"))
        assert (a == b) is same, (a["precision"], b["precision"])
        assert ("decoder" in a["precision"]) is not same
