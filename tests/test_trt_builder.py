"""Real TensorRT-RTX builds on CPU of tiny Q/DQ graphs: precision, refusals, timing cache."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from pipeline.stage import StageError
from pipeline.targets import load_catalog, with_fp8
from stages.lib.trt.backend import host_problem, local_gpu_sms, resolve_backend
from stages.lib.trt.builder import BuildOptions, build_engine, graph_quant_dtypes, refuse_unsupported
from stages.lib.trt.layer_report import report_from_log
from stages.lib.trt.profiles import profile_for, vision_patch_counts
from tests import trt_probe_graphs as G

CONV_PROFILE = {"x": ((1, 8, 16, 16), (1, 8, 32, 32), (2, 8, 64, 64))}
MHA_PROFILE = {"x": ((1, 8, 64), (1, 32, 64), (2, 128, 64))}


def _build(tmp: Path, graph: Path, sm: str, profile: dict, **kw):  # type: ignore[no-untyped-def]
    be = resolve_backend("tensorrt-rtx", sm)
    return build_engine(be, graph, tmp / f"{graph.stem}.engine", sm, profile, BuildOptions(**kw))


def test_tensorrt_rtx_is_importable() -> None:
    # CI installs TensorRT-RTX: its absence is a failure, not a skip
    assert host_problem("tensorrt-rtx", "8.6") is None
    be = resolve_backend("tensorrt-rtx", "8.6")
    assert be.aot and be.version[0].isdigit()


def test_int8_conv_relu_sm86(tmp_path: Path) -> None:
    g = G.conv_relu(tmp_path / "conv.onnx", "int8")
    assert graph_quant_dtypes(g) == {"int8"}
    r = _build(tmp_path, g, "8.6", CONV_PROFILE)
    assert r.bytes > 10_000 and r.path.stat().st_size == r.bytes and len(r.sha256) == 64
    # the plan is streamed to disk piece by piece: the digest is of the file, nothing half-written stays
    assert hashlib.sha256(r.path.read_bytes()).hexdigest() == r.sha256
    assert not list(tmp_path.glob("*.partial"))
    assert "compute_capability=SM86" in r.options_applied
    s = report_from_log(r.log)
    assert s.conv_layers == 2 and s.conv_fused_activation == 2
    assert s.gemm_conv_precisions == {"Int8": 2} and s.low_precision_share == 1.0
    assert [i["name"] for i in r.inputs] == ["x"] and r.inputs[0]["dtype"] == "half"
    assert r.inputs[0]["shape"] == [-1, 8, -1, -1]


def test_fp8_sm89_builds_fp8_gemms(tmp_path: Path) -> None:
    g = G.mha_mlp(tmp_path / "mha.onnx", "fp8")
    assert graph_quant_dtypes(g) == {"fp8"}
    s = report_from_log(_build(tmp_path, g, "8.9", MHA_PROFILE).log)
    assert s.fused_mha == 1
    assert set(s.gemm_conv_precisions) == {"FP8"} and s.low_precision_share == 1.0


def test_fp8_for_sm86_refused_before_building(tmp_path: Path) -> None:
    g = G.conv_relu(tmp_path / "conv.onnx", "fp8")
    rtx3090 = load_catalog()["rtx3090"].model_dump()
    with pytest.raises(StageError) as e:
        refuse_unsupported("vision", "int8", graph_quant_dtypes(g), rtx3090)  # the graph holds FP8 Q/DQ
    msg = str(e.value)
    assert "FP8 needs SM >= 8.9" in msg and "rtx3090 is SM 8.6" in msg
    assert ", ".join(with_fp8(load_catalog())) in msg
    with pytest.raises(StageError, match="asks for fp8"):
        refuse_unsupported("decoder", "fp8", set(), rtx3090)
    refuse_unsupported("vision", "fp8", {"fp8"}, load_catalog()["rtx4090"].model_dump())  # allowed


def test_builder_failure_is_a_stage_error(tmp_path: Path) -> None:
    # what the refusal above prevents: the builder itself only fails deep inside Myelin
    g = G.conv_relu(tmp_path / "conv.onnx", "fp8")
    with pytest.raises(StageError, match="HW-specific datatypes"):
        _build(tmp_path, g, "8.6", CONV_PROFILE)
    assert not list(tmp_path.glob("*.engine*"))  # no plan, not even a partial one


def test_full_tensorrt_missing_fails_clearly() -> None:
    problem = host_problem("tensorrt", "8.0")
    if problem is None:  # a GPU host with TensorRT and an SM 8.0 GPU: it must resolve
        assert resolve_backend("tensorrt", "8.0").name == "tensorrt"
        return
    assert "TensorRT" in problem and "8.0" in problem
    with pytest.raises(StageError, match="TensorRT"):
        resolve_backend("tensorrt", "8.0")
    if local_gpu_sms() is None:
        assert "GPU" in problem or "not importable" in problem


def test_rtx_refuses_hopper() -> None:
    assert "cannot compile for SM 9.0" in (host_problem("tensorrt-rtx", "9.0") or "")


def test_timing_cache_file_created_locked_and_reused(tmp_path: Path) -> None:
    # the file mechanics (lock, merge, atomic replace) through the real API; RTX accepts the
    # calls (and ignores the content), full TensorRT fills the same file with tactic timings
    g = G.mha_mlp(tmp_path / "mha.onnx", "int8")
    opts = {"timing_cache_dir": tmp_path / "tc", "target_name": "rtx4090", "timing_cache_on_rtx": True}
    first = _build(tmp_path, g, "8.9", MHA_PROFILE, **opts)
    assert first.timing_cache is not None and first.timing_cache["used"] and not first.timing_cache["warm"]
    path = Path(first.timing_cache["path"])
    assert path.is_file() and path.stat().st_size == first.timing_cache["saved_bytes"] > 0
    assert "tensorrt-rtx" in path.name and "rtx4090" in path.name and "sm8.9" in path.name
    assert Path(str(path) + ".lock").exists()  # filelock's lock file: concurrent builds serialize on it
    second = _build(tmp_path, g, "8.9", MHA_PROFILE, **opts)
    assert second.timing_cache is not None and second.timing_cache["warm"]
    assert second.timing_cache["loaded_bytes"] == first.timing_cache["saved_bytes"]
    assert second.sha256 == first.sha256  # a timing cache never changes the engine


def test_rtx_build_skips_the_noop_timing_cache(tmp_path: Path) -> None:
    g = G.conv_relu(tmp_path / "conv.onnx", "int8")
    r = _build(tmp_path, g, "8.6", CONV_PROFILE, timing_cache_dir=tmp_path / "tc", target_name="rtx3090")
    assert r.timing_cache is not None and r.timing_cache["used"] is False and "no-ops" in r.timing_cache["reason"]
    assert not (tmp_path / "tc").exists()


def test_profile_must_cover_dynamic_inputs(tmp_path: Path) -> None:
    g = G.conv_relu(tmp_path / "conv.onnx", "fp16")
    with pytest.raises(StageError, match="dynamic inputs without a profile: x"):
        _build(tmp_path, g, "8.9", {})
    with pytest.raises(StageError, match="does not fit input x"):
        _build(tmp_path, g, "8.9", {"x": ((1, 3, 16, 16), (1, 3, 16, 16), (1, 3, 16, 16))})


def test_weight_stripped_needs_a_gpu_with_rtx(tmp_path: Path) -> None:
    g = G.mha_mlp(tmp_path / "mha.onnx", "fp16")
    if local_gpu_sms():
        r = _build(tmp_path, g, "8.9", MHA_PROFILE, weight_stripped=True)
        assert "STRIP_PLAN" in r.options_applied
        return
    with pytest.raises(StageError, match="weight-stripped .* need a GPU at build time"):
        _build(tmp_path, g, "8.9", MHA_PROFILE, weight_stripped=True)


def test_compatibility_options(tmp_path: Path) -> None:
    g = G.conv_relu(tmp_path / "conv.onnx", "int8")
    r = _build(tmp_path, g, "8.6", CONV_PROFILE, hardware_compatible=True, version_compatible=True)
    assert {"hardware_compatibility_level=AMPERE_PLUS", "VERSION_COMPATIBLE", "EXCLUDE_LEAN_RUNTIME"} <= set(
        r.options_applied)
    r75 = _build(tmp_path, g, "7.5", CONV_PROFILE, hardware_compatible=True)
    assert any("hardware_compatible" in u for u in r75.options_unavailable)


def test_vision_patch_counts() -> None:
    vis = {"min_image": (56, 56), "opt_image": (224, 224), "max_image": (448, 448), "max_images": 2}
    assert vision_patch_counts(vis, 14, 2) == (16, 256, 2048)
    # sides snap to multiples of patch*merge as the Qwen processor does
    assert vision_patch_counts({**vis, "min_image": (60, 50)}, 14, 2)[0] == 4 * 4


def test_profile_for_decoder_and_vision() -> None:
    profiles = {"vision": {"min_image": (56, 56), "opt_image": (224, 224), "max_image": (448, 448), "max_images": 2},
                "decoder": {"batch": {"min": 1, "opt": 1, "max": 2}, "seq": {"min": 1, "opt": 64, "max": 256},
                            "past": {"min": 0, "opt": 64, "max": 256}}}
    dec = {"inputs": [{"name": "inputs_embeds", "shape": ["batch", "seq", 32]},
                      {"name": "attention_mask", "shape": ["batch", "total"]},
                      {"name": "past_key_values.0.key", "shape": ["batch", 2, "past", 16]}]}
    p = profile_for("decoder", dec, profiles)
    assert p["inputs_embeds"] == ((1, 1, 32), (1, 64, 32), (2, 256, 32))
    assert p["attention_mask"] == ((1, 1), (1, 128), (2, 512))
    assert p["past_key_values.0.key"][0] == (1, 2, 0, 16)
    vis = {"inputs": [{"name": "pixel_values", "shape": ["patches", 1176]}], "spec": {"patch_size": 14, "merge_size": 2}}
    assert profile_for("vision", vis, profiles)["pixel_values"] == ((16, 1176), (256, 1176), (2048, 1176))
    with pytest.raises(StageError, match="no patch_size"):
        profile_for("vision", {"inputs": vis["inputs"]}, profiles)


def test_progress_reaches_the_report(tmp_path: Path) -> None:
    g = G.mha_mlp(tmp_path / "mha.onnx", "fp16")
    seen: list[tuple[str, float | None]] = []
    be = resolve_backend("tensorrt-rtx", "8.9")

    def report(m: str, f: float | None = None) -> None:
        seen.append((m, f))

    build_engine(be, g, tmp_path / "e.engine", "8.9", MHA_PROFILE, BuildOptions(), report, graph="vision")
    assert all(m.startswith("vision: ") for m, _ in seen)
    assert any(m.startswith("vision: trt: ") for m, _ in seen)  # IProgressMonitor phases
    assert seen[-1] == (seen[-1][0], 1.0) and "built" in seen[-1][0]


def test_external_data_is_read_next_to_the_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import onnx

    src = G.mha_mlp(tmp_path / "src.onnx", "int8")
    ext = tmp_path / "ext"
    ext.mkdir()
    onnx.save(onnx.load(str(src)), str(ext / "model.onnx"), save_as_external_data=True,
              all_tensors_to_one_file=True, location="model.onnx.data", size_threshold=0)
    assert (ext / "model.onnx.data").stat().st_size > (ext / "model.onnx").stat().st_size
    monkeypatch.chdir(tmp_path)  # not the model's folder: the parser must resolve data by the model path
    r = _build(tmp_path, ext / "model.onnx", "8.9", MHA_PROFILE)
    (tmp_path / "inline").mkdir()
    assert r.sha256 == _build(tmp_path / "inline", src, "8.9", MHA_PROFILE).sha256  # same weights, same engine


def _save_in_process(args: tuple[str, int]) -> int:
    # one concurrent writer: attach, then save under the lock (what two parallel builds do)
    import tensorrt_rtx_bindings as trt  # the RTX API accepts the calls; the file logic is what is tested

    from stages.lib.trt import timing_cache as tc
    from stages.lib.trt.backend import make_logger

    path, _ = args
    config = trt.Builder(make_logger(trt, [])).create_builder_config()
    cache, use = tc.attach(config, Path(path))
    tc.save(config, cache, use)
    return use.saved_bytes


def test_timing_cache_concurrent_writers_leave_a_valid_file(tmp_path: Path) -> None:
    import multiprocessing as mp
    import warnings

    path = tmp_path / "tc" / "x.cache"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        with mp.get_context("spawn").Pool(4) as pool:
            sizes = pool.map(_save_in_process, [(str(path), i) for i in range(8)])
    assert all(s > 0 for s in sizes) and path.stat().st_size in sizes
    assert not list(path.parent.glob("*.tmp*"))  # every writer replaced the file atomically
    be = resolve_backend("tensorrt-rtx", "8.9")
    cfg = be.trt.Builder(be.trt.Logger()).create_builder_config()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        assert cfg.create_timing_cache(path.read_bytes()) is not None  # TensorRT reads it back


def test_byo_image_input_profiled_by_position() -> None:
    """A bring-your-own image input: dim 0 is the batch whatever it is called (or unnamed), and
    H/W are the declared resize, not profiles.vision's image range."""
    vision = {"min_image": [56, 56], "opt_image": [224, 224], "max_image": [448, 448], "max_images": 3}
    pre = {"input_name": "x", "layout": "NHWC", "resize": [96, 128]}
    spec = {"inputs": [{"name": "x", "shape": ["None", "h", "w", 3]}], "preprocess": pre}
    assert profile_for("vision", spec, {"vision": vision}) == {"x": ((1, 96, 128, 3), (1, 96, 128, 3), (3, 96, 128, 3))}
    with pytest.raises(StageError, match="has no profile rule"):  # without preprocess: no guessing
        profile_for("vision", {"inputs": spec["inputs"]}, {"vision": vision})


def test_dtype_tables_agree_with_onnx_and_ort(tmp_path: Path) -> None:
    """``stages.lib.dtypes``' ONNX tables spell what onnx and ORT spell; an io spec keeps a BF16
    graph's own dtype (the feed table says float32 for it)."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper

    from stages.lib import dtypes
    from stages.lib.export.decoder_graph import io_spec

    for t, name in dtypes.ONNX_DTYPES.items():
        assert str(np.dtype(helper.tensor_dtype_to_np_dtype(t))) == name, t
    for t, name in dtypes.ONNX_NUMPY.items():
        if t != TensorProto.BFLOAT16:
            assert dtypes.ORT_TYPES[np.dtype(name)] == dtypes.ort_type(t)
    assert dtypes.ort_type(TensorProto.FLOAT) == "tensor(float)" and dtypes.ONNX_NUMPY[TensorProto.BFLOAT16] == "float32"
    low = {helper.tensor_dtype_to_string(t).removeprefix("TensorProto."): p for t, p in dtypes.ONNX_LOW_PRECISION.items()}
    assert low == {"INT8": "int8", "UINT8": "int8", "INT4": "int4", "UINT4": "int4", "FLOAT8E4M3FN": "fp8",
                   "FLOAT8E4M3FNUZ": "fp8", "FLOAT8E5M2": "fp8", "FLOAT8E5M2FNUZ": "fp8"}
    g = helper.make_graph([helper.make_node("Cast", ["x"], ["y"], to=TensorProto.FLOAT)], "g",
                          [helper.make_tensor_value_info("x", TensorProto.BFLOAT16, ["n"])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n"])])
    onnx.save_model(helper.make_model(g), str(tmp_path / "g.onnx"))
    spec = io_spec(tmp_path / "g.onnx")
    assert [(e["dtype"], e["shape"]) for e in spec["inputs"] + spec["outputs"]] == [("bfloat16", ["n"]), ("float32", ["n"])]
