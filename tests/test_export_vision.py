"""export_vision stage: all three families, FP32 and FP16, parity on shapes unlike the sample."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from pipeline.config import BuildConfig
from pipeline.stage import StageContext, StageError, missed_message
from stages import checkpoint as ck_stage
from stages import export_vision as ev

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")


def _cfg(family: str = "qwen2_vl", **over: Any) -> BuildConfig:
    return BuildConfig.model_validate({"name": "t", "model": {"generate": "tiny", "family": family},
                                       "targets": ["rtx4090"], **over})


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = {}
    for fam in FAMILIES:
        d = tmp_path_factory.mktemp(f"ck_{fam}")
        cfg = _cfg(fam)
        ck_stage.STAGE.run(StageContext("checkpoint", ck_stage.STAGE.params(cfg, None), {}, d, None, []))
        out[fam] = d
    return out


def _run(cfg: BuildConfig, ckpt: Path, out: Path) -> Any:
    out.mkdir(parents=True, exist_ok=True)
    ctx = StageContext("export_vision", ev.STAGE.params(cfg, None), {"checkpoint": ckpt}, out, None, [])
    return ev.STAGE.run(ctx)


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
@pytest.mark.parametrize("family", FAMILIES)
def test_export_passes_parity(family: str, dtype: str, ckpts: dict[str, Path], tmp_path: Path) -> None:
    res = _run(_cfg(family, export={"dtype": dtype}), ckpts[family], tmp_path)
    assert res.gates and all(g.passed for g in res.gates)
    assert res.metrics["cosine"] > (0.999999 if dtype == "fp32" else 0.9999)
    for key in ("max_abs", "rel_l2", "export_seconds", "onnx_bytes", "peak_rss_bytes"):
        assert res.metrics[key] >= 0
    spec = json.loads((tmp_path / "vision.json").read_text())
    assert spec["dtype"] == dtype and spec["opset"] == 19 and spec["family"] == family
    names = [i["name"] for i in spec["inputs"]]
    assert names[:4] == ["pixel_values", "rotary_cos", "rotary_sin", "attn_segments"]
    assert ("window_segments" in names) == (family == "qwen2_5_vl")
    assert [o["name"] for o in spec["outputs"]] == (
        ["image_features", "deepstack_features"] if family == "qwen3_vl" else ["image_features"])
    assert spec["outputs"][0]["dtype"] == {"fp32": "float32", "fp16": "float16"}[dtype]
    # parity ran on shapes other than the export sample, and on two images at once
    grids = [c["grid_thw"] for c in spec["parity"]["cases"]]
    assert spec["sample_grid_thw"] not in grids and any(len(g) == 2 for g in grids)
    prof = spec["profile"]["patches"]
    assert prof["min"] <= prof["opt"] <= prof["max"]
    assert res.metrics["exporter"] == "dynamo"
    # the ONNX axes carry the names vision.json uses; nothing about the sample is fixed
    import onnx

    g = onnx.load(str(tmp_path / "vision.onnx"), load_external_data=False).graph
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in [*g.input, *g.output]}
    assert all(dims[i["name"]] == i["shape"] for i in spec["inputs"] + spec["outputs"]), dims


def test_torchscript_fallback(ckpts: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """When torch.export cannot trace, the legacy exporter takes over and parity still holds."""
    import torch

    def refuse(*a: Any, **k: Any) -> Any:
        raise RuntimeError("torch.export refused")

    monkeypatch.setattr(torch.export, "export", refuse)
    res = _run(_cfg("qwen2_5_vl"), ckpts["qwen2_5_vl"], tmp_path)
    assert res.metrics["exporter"] == "torchscript" and all(g.passed for g in res.gates)


def test_fp32_blocks_and_norms_stay_fp32(ckpts: dict[str, Path], tmp_path: Path) -> None:
    res = _run(_cfg("qwen2_vl", export={"dtype": "fp16", "fp32_vision_blocks": [1]}), ckpts["qwen2_vl"], tmp_path)
    spec = json.loads((tmp_path / "vision.json").read_text())
    assert "blocks.1" in spec["fp32_islands"] and any("norm" in x for x in spec["fp32_islands"])
    assert all(g.passed for g in res.gates)


def test_image_size_outside_profile_is_one_line(ckpts: dict[str, Path], tmp_path: Path) -> None:
    cfg = _cfg("qwen2_vl", verify={"image_sizes": [[112, 168], [896, 224]]})
    with pytest.raises(StageError) as e:
        _run(cfg, ckpts["qwen2_vl"], tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and "896x224" in msg and "profiles.vision" in msg
    assert not (tmp_path / "vision.onnx").exists()  # refused before any work


def test_export_with_a_baked_shape_fails_parity(ckpts: dict[str, Path], tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """An export that froze the sample's patch count must miss the gate on the other sizes."""
    import torch

    from stages.lib.export import vision as vision_export
    from stages.lib.patches import vision as pv

    def static_export(visual: Any, family: str, args: Any, names: Any, outs: Any, path: Path, opset: int,
                      *_: Any) -> tuple[str, str]:
        torch.onnx.export(pv.export_module(visual, family), args, str(path), input_names=names, output_names=outs,
                          opset_version=opset, dynamo=False)  # no dynamic_axes: shapes baked
        return "torchscript", "trace (every block)"

    monkeypatch.setattr(vision_export, "_export", static_export)
    res = _run(_cfg("qwen2_5_vl"), ckpts["qwen2_5_vl"], tmp_path)  # the worker fails the node from its gates
    missed = missed_message(res.gates)
    assert missed is not None and "vision.cosine" in missed
    assert not res.gates[0].passed


def test_bring_your_own_onnx(tmp_path: Path, ckpts: dict[str, Path]) -> None:
    import torch

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten(), torch.nn.Linear(8, 5)).eval()
    src = tmp_path / "cnn.onnx"
    torch.onnx.export(net, (torch.randn(1, 3, 64, 64),), str(src), input_names=["image"], output_names=["logits"],
                      dynamic_axes={"image": {0: "batch"}}, opset_version=19, dynamo=False)
    cfg = _cfg("qwen2_vl", model={"generate": "tiny", "family": "qwen2_vl",
                                  "vision_onnx": {"path": str(src), "input_name": "image", "resize": [64, 64]}})
    assert ev.STAGE.external is not None and src in ev.STAGE.external(cfg)
    res = _run(cfg, ckpts["qwen2_vl"], tmp_path / "out")
    spec = json.loads((tmp_path / "out" / "vision.json").read_text())
    assert spec["preprocess"]["input_name"] == "image" and spec["preprocess"]["resize"] == [64, 64]
    assert spec["inputs"][0]["shape"] == ["batch", 3, 64, 64] and spec["parity"]["output_shapes"] == [[1, 5]]
    assert res.metrics["onnx_bytes"] == src.stat().st_size

    bad = _cfg("qwen2_vl", model={"generate": "tiny", "family": "qwen2_vl",
                                  "vision_onnx": {"path": str(src), "input_name": "pixels"}})
    with pytest.raises(StageError, match="not an input"):
        _run(bad, ckpts["qwen2_vl"], tmp_path / "bad")


@pytest.mark.slow
def test_bf16_export(ckpts: dict[str, Path], tmp_path: Path) -> None:
    res = _run(_cfg("qwen2_5_vl", export={"dtype": "bf16"}), ckpts["qwen2_5_vl"], tmp_path)
    assert all(g.passed for g in res.gates)
    assert "bf16 widened" in json.loads((tmp_path / "vision.json").read_text())["parity"]["runtime"]


def test_big_tower_exports_in_a_child_process(ckpts: dict[str, Path], tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Above CHILD_ABOVE the export runs in a spawned process (the exporter's leftovers leave
    with it); the graph, its facts and the parity come out as in-process. The patch below holds
    only in this process: an export here fails the test, the spawned child imports the real one."""
    from stages.lib.export import vision as vision_export

    monkeypatch.setattr(vision_export, "CHILD_ABOVE", 0)

    def not_here(*a: Any, **k: Any) -> Any:
        raise AssertionError("exported in the stage's own process")

    monkeypatch.setattr(vision_export, "export_graph", not_here)
    res = _run(_cfg("qwen3_vl", export={"dtype": "fp16"}), ckpts["qwen3_vl"], tmp_path)
    assert all(g.passed for g in res.gates) and res.metrics["cosine"] > 0.9999
    assert any("child process" in n for n in res.notes)
    assert res.metrics["export_peak_rss_bytes"] > 100 * 2**20  # the child's peak, reported
