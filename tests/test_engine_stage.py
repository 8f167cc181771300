"""The engine stage on hand-made quantize@T folders: real TensorRT-RTX engines built on CPU."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from pipeline.config import BuildConfig
from pipeline.stage import StageContext, StageError
from pipeline.targets import load_catalog, with_fp8
from stages.engine import STAGE
from tests import trt_probe_graphs as G

DIM = 64


def _cfg(**over: Any) -> BuildConfig:
    return BuildConfig.model_validate({"name": "t", "model": {"generate": "tiny", "family": "qwen2_vl"},
                                       "targets": ["rtx3090"], **over})


def _quantize_folder(root: Path, mode: str, cnn: bool = False) -> Path:
    """A quantize@T output: vision (MHA over patches, or a Conv+ReLU tower) and decoder graphs."""
    f = root / f"quantize-{mode}{'-cnn' if cnn else ''}"
    f.mkdir(parents=True)
    if cnn:
        G.conv_relu(f / "vision.onnx", mode)  # type: ignore[arg-type]
        vis_in = [{"name": "x", "dtype": "fp16", "shape": ["batch", 8, "height", "width"]}]
    else:
        G.mha_mlp(f / "vision.onnx", mode, dim=DIM)  # type: ignore[arg-type]
        vis_in = [{"name": "x", "dtype": "fp16", "shape": ["images", "patches", DIM]}]
    G.mha_mlp(f / "decoder.onnx", mode, dim=DIM, blocks=2, seed=1)  # type: ignore[arg-type]
    (f / "vision.json").write_text(json.dumps({"inputs": vis_in, "outputs": [], "dtype": "fp16", "opset": 19,
                                               "spec": {"patch_size": 14, "merge_size": 2}}))
    (f / "decoder.json").write_text(json.dumps({"inputs": [{"name": "x", "dtype": "fp16", "shape": ["batch", "seq", DIM]}],
                                                "outputs": [], "dtype": "fp16", "opset": 19}))
    (f / "quantize.json").write_text(json.dumps({"vision": {"precision": mode}, "decoder": {"precision": mode}}))
    return f


def _run(tmp: Path, folder: Path, target_name: str, cfg: BuildConfig | None = None) -> tuple[Any, Path]:
    cfg = cfg or _cfg()
    target = load_catalog()[target_name]
    out = tmp / f"out-{target_name}-{folder.name}"
    out.mkdir(parents=True, exist_ok=True)
    ctx = StageContext(node_id=f"engine@{target_name}", params=STAGE.params(cfg, target),
                       inputs={"quantize": folder}, out=out, target=target.model_dump(), external=[])
    return STAGE.run(ctx), out


@pytest.fixture(autouse=True)
def _private_timing_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLMFORGE_TIMING_CACHE_DIR", str(tmp_path / "timing-caches"))


def test_declaration() -> None:
    assert STAGE.name == "engine" and STAGE.per_target and STAGE.deps == ("quantize",)
    p = STAGE.params(_cfg(), load_catalog()["rtx3090"])
    json.dumps(p)  # JSON-able
    assert "timing" not in json.dumps(p).replace('"timing_cache": true', "")  # no cache path in the key


def test_int8_engines_for_rtx3090(tmp_path: Path) -> None:
    res, out = _run(tmp_path, _quantize_folder(tmp_path, "int8"), "rtx3090")
    for g in ("vision", "decoder"):
        assert (out / f"{g}.engine").stat().st_size > 10_000
        side = json.loads((out / f"{g}.engine.json").read_text())
        assert side["target"] == "rtx3090" and side["sm"] == "8.6" and side["builder"] == "tensorrt-rtx"
        assert side["builder_version"].startswith("1.") and side["precision"] == "int8"
        assert side["qdq_dtypes"] == ["int8"] and side["precisions"] == {"vision": "int8", "decoder": "int8"}
        assert side["sha256"] == hashlib.sha256((out / f"{g}.engine").read_bytes()).hexdigest()
        assert side["bytes"] == (out / f"{g}.engine").stat().st_size
        assert side["build_seconds"] > 0 and side["peak_rss_mb"] > 50
        assert side["inputs"] == [{"name": "x", "dtype": "half", "shape": [-1, -1, DIM]}]
        assert side["outputs"][0]["name"] == "y"
        assert side["parity"]["status"].startswith("not run: ")
        assert side["timing_cache"]["used"] is False  # RTX ignores timing caches: said, not faked
        layers = json.loads((out / f"{g}.layers.json").read_text())
        assert layers["layers"] == len(layers["per_layer"]) == res.metrics[g]["layers"]
        m = res.metrics[g]
        assert m["low_precision_gemm_share"] == 1.0 and m["bytes"] == side["bytes"]
        # the builder's own share, apart from what the process held before it (bench/scale.py prints it)
        assert 0 <= m["builder_anon_mb"] == side["builder_anon_mb"] <= side["peak_rss_mb"]
        assert 0 < m["anon_before_build_mb"] <= side["peak_rss_mb"]
    # patch counts from cfg.profiles.vision: 56² → 16 patches, 224² → 256, 2 × 448² → 2048
    prof = json.loads((out / "vision.engine.json").read_text())["profile"]["x"]
    assert prof == {"min": [1, 16, DIM], "opt": [1, 256, DIM], "max": [2, 2048, DIM]}
    dprof = json.loads((out / "decoder.engine.json").read_text())["profile"]["x"]
    assert dprof == {"min": [1, 1, DIM], "opt": [1, 64, DIM], "max": [2, 256, DIM]}
    assert res.metrics["vision"]["fused_mha"] == 1 and res.metrics["decoder"]["fused_mha"] == 2
    assert res.metrics["decoder"]["softmax_in_mha"] == "2/2"
    assert any("parity not run" in n for n in res.notes) and not res.gates


def test_fp8_engines_for_rtx4090_and_cnn_tower(tmp_path: Path) -> None:
    res, out = _run(tmp_path, _quantize_folder(tmp_path, "fp8", cnn=True), "rtx4090")
    assert res.metrics["vision"]["conv_fused_activation"] == 2
    assert res.metrics["vision"]["low_precision_gemm_share"] == 1.0
    side = json.loads((out / "vision.engine.json").read_text())
    assert side["qdq_dtypes"] == ["fp8"] and side["profile"]["x"]["max"] == [2, 8, 448, 448]
    assert json.loads((out / "decoder.layers.json").read_text())["gemm_conv_precisions"].keys() == {"FP8"}


def test_fp8_for_rtx3090_refused_before_any_build(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import stages.lib.trt.builder as tb

    def no_build(*a: Any, **k: Any) -> None:
        raise AssertionError("a build started")

    monkeypatch.setattr(tb, "build_engine", no_build)
    with pytest.raises(StageError) as e:
        _run(tmp_path, _quantize_folder(tmp_path, "fp8"), "rtx3090")
    assert "FP8 needs SM >= 8.9" in str(e.value) and ", ".join(with_fp8(load_catalog())) in str(e.value)


def test_tensorrt_target_fails_clearly_here(tmp_path: Path) -> None:
    from stages.lib.trt.backend import host_problem

    reason = STAGE.needs_host(_cfg(), load_catalog()["a100"]) if STAGE.needs_host else None
    assert reason == host_problem("tensorrt", "8.0")
    assert STAGE.needs_host is not None and STAGE.needs_host(_cfg(), load_catalog()["rtx3090"]) is None
    if reason is None:
        pytest.fail("this host has full TensorRT and an SM 8.0 GPU: this test expects a CPU-only host")
    with pytest.raises(StageError, match="TensorRT"):
        _run(tmp_path, _quantize_folder(tmp_path, "int8"), "a100")


def test_missing_inputs_are_stage_errors(tmp_path: Path) -> None:
    f = _quantize_folder(tmp_path, "fp16")
    (f / "quantize.json").unlink()
    with pytest.raises(StageError, match="quantize.json is missing"):
        _run(tmp_path, f, "rtx4090")
    g = _quantize_folder(tmp_path / "b", "fp16")
    (g / "vision.json").write_text(json.dumps({"inputs": [{"name": "x", "shape": ["images", "patches", DIM]}]}))
    with pytest.raises(StageError, match="no patch_size"):
        _run(tmp_path, g, "rtx4090")


@pytest.mark.slow
def test_three_targets_three_precisions(tmp_path: Path) -> None:
    for target, mode in (("rtx3090", "int8"), ("rtx4090", "fp8"), ("rtx5090", "fp8"), ("dgx-spark", "int8")):
        res, _ = _run(tmp_path, _quantize_folder(tmp_path / target, mode), target)
        assert res.metrics["decoder"]["fused_mha"] == 2 and res.metrics["decoder"]["low_precision_gemm_share"] == 1.0
