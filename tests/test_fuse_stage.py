"""The fuse stage run directly (no runner) on tiny exporter-shaped graphs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from pipeline.config import BuildConfig
from pipeline.stage import StageContext, StageError
from stages.fuse import STAGE
from stages.lib.fusion.annotate import read_fusion_groups
from tests.fusion_samples import AttnSpec, attention_model, conv_model


def _cfg(**fuse: object) -> BuildConfig:
    return BuildConfig.model_validate({"name": "t", "model": {"generate": "cnn-tiny"}, "targets": ["rtx4090"],
                                       "fuse": fuse})


def _spec(model: onnx.ModelProto) -> dict:
    def io(v: onnx.ValueInfoProto) -> dict:
        dims = [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
        return {"name": v.name, "dtype": "float32", "shape": dims}

    return {"inputs": [io(i) for i in model.graph.input], "outputs": [io(o) for o in model.graph.output],
            "profile": {"batch": {"min": 2, "opt": 2, "max": 4}}, "dtype": "fp32", "opset": 19}


def _exports(tmp: Path, opset: int = 19, decoder: bool = True) -> dict[str, Path]:
    vis, dec = tmp / "export_vision", tmp / "export_decoder"
    vis.mkdir()
    dec.mkdir()
    v = attention_model(AttnSpec(scale="qk_sqrt_both", torchlib_kt=True, mask="window", layers=2, opset=opset))
    onnx.save(v, vis / "vision.onnx")
    (vis / "vision.json").write_text(json.dumps(_spec(v)))
    if decoder:
        d = attention_model(AttnSpec(kv_cache=True, n_rep=2, mask="causal", softmax_fp32=True, layers=2, opset=opset))
        onnx.save(d, dec / "decoder.onnx")
        (dec / "decoder.json").write_text(json.dumps(_spec(d)))
        table = onnx.numpy_helper.from_array(np.ones((16, 64), np.float32), "table")
        g = helper.make_graph([helper.make_node("Gather", ["table", "input_ids"], ["inputs_embeds"])], "embed",
                              [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])],
                              [helper.make_tensor_value_info("inputs_embeds", TensorProto.FLOAT, None)], [table])
        onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)]), dec / "embed.onnx")
    return {"export_vision": vis, "export_decoder": dec}


def _run(tmp: Path, inputs: dict[str, Path], cfg: BuildConfig) -> tuple[Path, object]:
    out = tmp / "out"
    ctx = StageContext(node_id="fuse", params=STAGE.params(cfg, None), inputs=inputs, out=out, target=None,
                       external=[])
    return out, STAGE.run(ctx)


@pytest.mark.parametrize("opset", [19, 23])
def test_fuse_stage_vlm(tmp_path: Path, opset: int) -> None:
    out, res = _run(tmp_path, _exports(tmp_path, opset), _cfg())
    for name in ("vision.onnx", "decoder.onnx", "embed.onnx", "fuse.json", "vision.json", "decoder.json"):
        assert (out / name).is_file(), name
    rep = json.loads((out / "fuse.json").read_text())
    mode = "onnx-attention" if opset >= 23 else "canonical"
    for g in ("vision", "decoder"):
        e = rep["graphs"][g]
        assert e["attention_mode"] == mode
        assert e["rules"][f"attention[{mode}]"]["matches"] == 2
        assert e["mha_groups"] == 2 and e["unfused_softmax"] == 0
        assert e["nodes_after"] < e["nodes_before"]
        assert e["check"]["max_abs"] <= e["check"]["tolerance"] <= 1e-5 * max(1.0, e["check"]["ref_max"])
    assert res.metrics["decoder"]["mha_groups"] == 2  # type: ignore[attr-defined]
    fused = onnx.load(str(out / "decoder.onnx"))
    assert sum(k == "mha" for _, k, _ in read_fusion_groups(fused).values()) == (2 if opset >= 23 else 10)  # 5 roles each
    assert (out / "embed.onnx").read_bytes() == (tmp_path / "export_decoder" / "embed.onnx").read_bytes()


def test_fuse_stage_vision_only_cnn(tmp_path: Path) -> None:
    vis = tmp_path / "export_vision"
    vis.mkdir()
    m = conv_model()
    onnx.save(m, vis / "vision.onnx")
    (vis / "vision.json").write_text(json.dumps(_spec(m)))
    empty = tmp_path / "export_decoder"
    empty.mkdir()
    out, _ = _run(tmp_path, {"export_vision": vis, "export_decoder": empty}, _cfg())
    assert not (out / "decoder.onnx").exists() and not (out / "embed.onnx").exists()
    rep = json.loads((out / "fuse.json").read_text())
    assert rep["decoder"].startswith("absent")
    e = rep["graphs"]["vision"]
    assert e["rules"]["fold_batchnorm"]["matches"] == 3 and e["conv_act_groups"] == 3
    assert "BatchNormalization" not in e["ops_after"]
    assert e["check"]["inputs"]["pixel_values"][0] == 2  # batch from the io spec profile


def test_fuse_off_switches(tmp_path: Path) -> None:
    out, _ = _run(tmp_path, _exports(tmp_path), _cfg(attention="off", fold_batchnorm=False))
    rep = json.loads((out / "fuse.json").read_text())
    e = rep["graphs"]["decoder"]
    assert e["attention_mode"] is None and not any(k.startswith("attention") for k in e["rules"])
    assert e["mha_groups"] == 0 and e["unfused_softmax"] == 2


def test_onnx_attention_at_opset_19_is_a_stage_error(tmp_path: Path) -> None:
    with pytest.raises(StageError, match="opset >= 23"):
        _run(tmp_path, _exports(tmp_path, 19), _cfg(attention="onnx-attention"))


def test_numeric_drift_fails_the_stage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import stages.lib.fusion as fusion

    real = fusion.apply_rules

    def broken(model, **kw):  # type: ignore[no-untyped-def]
        rep = real(model, **kw)
        w = model.graph.initializers["l0_wq"]
        import onnx_ir as ir

        w.const_value = ir.tensor(w.const_value.numpy() * 1.01)  # a "rule" that changed the math
        return rep

    monkeypatch.setattr(fusion, "apply_rules", broken)
    with pytest.raises(StageError, match="fusion changed the outputs"):
        _run(tmp_path, _exports(tmp_path, decoder=False), _cfg())
