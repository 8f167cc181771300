"""KV-cache precision (precision.kv_cache, stages.lib.qdq.kv_cache): the tiny model's real fused
decoder with an INT8 / FP8 cache. Its codes survive a step unchanged, a chunk read through it
gives the full prefill's logits, verify's token figure reads through it (a crushed scale fails
it while the prefill figures do not move), TensorRT-RTX builds engines whose cache I/O is 8-bit,
and a target without FP8 is refused an FP8 cache before anything builds."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

from pipeline.config import BuildConfig
from stages.lib.qdq import kv_cache
from tests.conftest import BASE_CONFIG, Cli
from tests.qdq_stage_fixtures import run_stage

CFG = BuildConfig.model_validate({"name": "kv", "model": {"generate": "tiny", "family": "qwen2_5_vl"},
                                  "targets": ["rtx3090"]})


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """checkpoint -> export -> fuse -> calibrate, and the held-out reference, by the real stages."""
    work = tmp_path_factory.mktemp("kv")
    for name in ("checkpoint", "reference", "export_vision", "export_decoder", "fuse", "calibrate"):
        run_stage(work, CFG, name)
    return work


def _with_cache(chain: Path, dst: Path, precision: str, crush: float = 1.0) -> Path:
    """The fused decoder (and its io spec) copied to ``dst`` and given a ``precision`` cache; ``crush``
    divides every scale (a badly calibrated cache: the codes saturate)."""
    dst.mkdir(parents=True)
    for f in ("decoder.onnx", "decoder.json"):
        shutil.copy2(chain / "fuse" / f, dst / f)
    ranges = json.loads((chain / "calibrate" / "ranges_decoder.json").read_text())
    for name, t in ranges["tensors"].items():
        if name.startswith(kv_cache.PRESENT):
            t["max_abs"] /= crush
    (dst / "ranges.json").write_text(json.dumps(ranges))
    kv = kv_cache.apply(dst / "decoder.onnx", dst / "ranges.json", precision)
    assert kv.precision == precision
    return dst / "decoder.onnx"


def _feeds(path: Path, s: int, h: int, past: list[np.ndarray] | None = None, start: int = 0,
           total: int | None = None) -> dict[str, np.ndarray]:
    from stages.lib.hostside import text as host
    from stages.lib.segments.runner import graph_inputs

    rng = np.random.default_rng(7)
    emb = (rng.standard_normal((1, 24, h)) * 0.05).astype(np.float16)[:, start:start + s]
    pos = np.broadcast_to(np.arange(start, start + s), (3, 1, s)).copy()
    return host.prefill_feeds(graph_inputs(path), emb, np.ones((1, total or start + s), np.int64), pos, past=past)


def _run(path: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    from stages.lib.ortsession import ort_session

    sess = ort_session(path, optimization="none")
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds), strict=True))


@pytest.mark.parametrize(("precision", "elem"), [("int8", onnx.TensorProto.INT8),
                                                 ("fp8", onnx.TensorProto.FLOAT8E4M3FN)])
def test_cache_io_is_8_bit_and_a_chunk_through_it_matches_the_full_prefill(
        chain: Path, tmp_path: Path, precision: str, elem: int) -> None:
    path = _with_cache(chain, tmp_path / precision, precision)
    m = onnx.load(str(path))
    onnx.checker.check_model(m, full_check=True)
    pasts = [v for v in m.graph.input if v.name.startswith(kv_cache.PAST)]
    presents = [v for v in m.graph.output if v.name.startswith(kv_cache.PRESENT)]
    assert pasts and len(pasts) == len(presents)
    assert {v.type.tensor_type.elem_type for v in pasts + presents} == {elem}
    assert {p.key: p.value for p in m.metadata_props}[kv_cache.META] == precision
    from stages.lib.segments.runner import graph_inputs

    h = int(next(i for i in graph_inputs(path) if i.name == "inputs_embeds").shape[-1])
    full = _run(chain / "fuse" / "decoder.onnx", _feeds(chain / "fuse" / "decoder.onnx", 24, h))["logits"]
    first = _run(path, _feeds(path, 16, h))
    past = [first[v.name] for v in presents]
    assert past[0].dtype == (np.int8 if precision == "int8" else np.uint8)  # FP8 travels as its bits
    second = _run(path, _feeds(path, 8, h, past=past, start=16))
    # the codes a step read come back unchanged: re-quantizing the dequantized past is exact
    assert all(np.array_equal(second[v.name][:, :, :16], p) for v, p in zip(presents, past, strict=True))
    a, b = full[0, 16:].astype(np.float64), second["logits"][0].astype(np.float64)
    cos = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
    assert cos.min() > 0.98, cos


def test_a_graph_with_external_weights_keeps_its_data_file_untouched(chain: Path, tmp_path: Path) -> None:
    """How a 7-8 B decoder is stored: the pass edits the structure only; the weights file is not
    rewritten, and the graph still runs, its prefill logits unchanged (the prefill reads no cache)."""
    src = onnx.load(str(chain / "fuse" / "decoder.onnx"))
    path = tmp_path / "decoder.onnx"
    onnx.save_model(src, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="decoder.onnx.data", size_threshold=1024)
    data = (tmp_path / "decoder.onnx.data").read_bytes()
    from stages.lib.segments.runner import graph_inputs

    h = int(next(i for i in graph_inputs(path) if i.name == "inputs_embeds").shape[-1])
    before = _run(path, _feeds(path, 8, h))
    kv_cache.apply(path, chain / "calibrate" / "ranges_decoder.json", "int8")
    after = _run(path, _feeds(path, 8, h))
    assert (tmp_path / "decoder.onnx.data").read_bytes() == data
    locations = {e.value for t in onnx.load(str(path), load_external_data=False).graph.initializer
                 for e in t.external_data if e.key == "location"}
    assert locations == {"decoder.onnx.data"}
    assert after["present.0.key"].dtype == np.int8 and np.array_equal(before["logits"], after["logits"])


def test_verify_grades_generated_tokens_through_the_cache(chain: Path, tmp_path: Path) -> None:
    """A crushed cache scale leaves the prefill (which reads no cache) as it was and fails the
    token figure read through the cache; the calibrated cache meets the default gate."""
    from stages.lib.parity import graphs as vg
    from stages.lib.parity.feeds import load_specs
    from stages.lib.parity.metrics import export_noise
    from stages.lib.reference_io import load_reference

    _, samples = load_reference(chain / "reference")
    specs = load_specs(chain / "checkpoint")
    noise = export_noise(chain / "fuse")
    embed = chain / "fuse" / "embed.onnx"
    got: dict[str, Any] = {}
    for name, path in (("fp16", chain / "fuse" / "decoder.onnx"), ("int8", _with_cache(chain, tmp_path / "a", "int8")),
                       ("crushed", _with_cache(chain, tmp_path / "b", "int8", crush=50.0))):
        assert (vg.quantized_cache(path) is None) == (name == "fp16")
        prefill, forced = vg.measure_decoder(path, specs, samples, embed, 16, noise=noise)
        assert forced is not None
        got[name] = (prefill.figures, forced.figures)
    gate = CFG.gates["int8"]
    assert got["int8"][1]["tokens"] >= gate.tokens
    assert got["crushed"][0]["top1"] == got["fp16"][0]["top1"]  # the prefill cannot see the cache
    assert got["crushed"][1]["tokens"] < gate.tokens, got["crushed"][1]


@pytest.mark.parametrize(("precision", "sm", "trt_type"), [("int8", "8.6", "int8"), ("fp8", "8.9", "fp8")])
def test_tensorrt_rtx_builds_the_decoder_with_an_8_bit_cache(chain: Path, tmp_path: Path, precision: str,
                                                             sm: str, trt_type: str) -> None:
    from stages.engine import _kv_cache
    from stages.lib.trt.backend import resolve_backend
    from stages.lib.trt.builder import BuildOptions, build_engine
    from stages.lib.trt.profiles import profile_for

    path = _with_cache(chain, tmp_path / precision, precision)
    spec = json.loads((chain / "fuse" / "decoder.json").read_text())
    profile = profile_for("decoder", spec, CFG.profiles.model_dump(mode="json"))
    built = build_engine(resolve_backend("tensorrt-rtx", sm), path, tmp_path / "decoder.engine", sm, profile,
                         BuildOptions(workspace_mb=256, optimization_level=0))
    kv_io = [t for t in built.inputs + built.outputs if t["name"].startswith((kv_cache.PAST, kv_cache.PRESENT))]
    assert kv_io and {t["dtype"] for t in kv_io} == {trt_type}
    kv = _kv_cache(built.inputs, profile)
    assert kv is not None and kv["at_profile_max_mib"] * 2 == pytest.approx(kv["fp16_at_profile_max_mib"])


def test_an_fp8_cache_on_a_target_without_fp8_is_refused_before_building(cli: Cli) -> None:
    cfg = cli.config(BASE_CONFIG.replace("[rtx3090, rtx4090]", "[rtx4090, rtx3090]")
                     + "precision: {kv_cache: fp8}\n")
    r = cli("plan", str(cfg), check=2)
    line = r.stderr.strip().splitlines()[-1]
    assert "precision.kv_cache" in line and "rtx3090 is SM 8.6" in line and "kv_cache: int8" in line


def test_apply_refuses_a_graph_without_presents_and_an_old_calibration(tmp_path: Path) -> None:
    assert kv_cache.kv_pairs(["past_key_values.1.key", "past_key_values.0.key"],
                             ["present.0.key", "present.1.key"]) == [("past_key_values.0.key", "present.0.key"),
                                                                     ("past_key_values.1.key", "present.1.key")]
    with pytest.raises(ValueError, match="past_key_values.0.value has no output present.0.value"):
        kv_cache.kv_pairs(["past_key_values.0.value"], ["logits"])
    with pytest.raises(ValueError, match="older calibrate stage"):
        kv_cache.scales_from_ranges({"tensors": {"x": {"max_abs": 1.0}}}, "int8", "ranges_decoder.json")
    assert kv_cache.scales_from_ranges({"tensors": {"present.0.key": {"max_abs": 0.0}}}, "fp8", "r") == \
        {"present.0.key": 1.0 / 448}


@pytest.mark.slow
def test_an_fp8_cache_builds_verifies_and_runs_from_its_package(tmp_path: Path) -> None:
    """The tiny default with ``precision.kv_cache: fp8`` for rtx4090, end to end through the CLI:
    the quantize report says what the cache costs, the engine's cache I/O is FP8, verify's token
    gate reads through the cache, and the package's own check runs it (onnxruntime backend)."""
    from tests.test_package_stage_cli import REAL

    cli = Cli(tmp_path, stages=REAL)
    cfg = cli.config("name: kvf\nmodel: {generate: tiny, family: qwen2_5_vl, seed: 0}\ntargets: [rtx4090]\n"
                     "precision: {kv_cache: fp8}\n", "kvf.yaml")
    doc: Any = cli.json("build", str(cfg), "--until", "package", "-j", "1")
    nodes = {n["id"]: n for n in doc["nodes"]}
    kv = nodes["quantize@rtx4090"]["metrics"]["decoder"]["kv_cache"]
    assert kv["precision"] == "fp8" and kv["saving_vs_fp16"] == 0.5 and kv["bytes_per_token"] > 0
    assert nodes["engine@rtx4090"]["metrics"]["decoder_kv_cache"]["dtype"] == "fp8"
    gen = nodes["verify@rtx4090"]["metrics"]["rows"]["generation.onnxruntime"]
    assert gen["status"] == "pass" and gen["gated_on"].endswith("read through the fp8 KV cache")
    tar = cli.tmp / "artifacts" / "out" / "kvf" / "package@rtx4090" / "package.tar"
    r = cli("check", str(tar), "--backend", "onnxruntime")
    assert "generation pass    vision:fp8+decoder:fp8+kv_cache:fp8" in r.stdout, r.stdout
