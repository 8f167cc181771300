"""vlmforge vs onnxruntime `quantize_static` vs NVIDIA ModelOpt ONNX PTQ on a real trained CNN, one run.

    .venv/bin/python bench/byo_real.py --work /tmp/byo_bench [--model det.onnx] \\
        [--calibration DIR] [--held-out DIR] [--ort-fp8] [--no-modelopt]

Without --calibration / --held-out the images are those of ``tests/test_real_detector.py``: four
rendered document pages to calibrate on; two other rendered pages and scikit-image's real scan
``page.png`` (``tests/real_models.py``: PAGE_SCAN, from the pinned wheel) held out.

The model is PaddleOCR's PP-OCRv4 text detector (a DB CNN: Conv/BN/HardSigmoid, ConvTranspose,
Resize; opset 12, input ``x`` NCHW with dynamic H/W, output ``sigmoid_0.tmp_0`` [N,1,H,W]), as
RapidOCR ships it: without ``--model`` it comes from ``tests/real_models.py`` (``PPOCR_DET.fetch``:
a pip download of the pinned wheel, digest checked), else from the file given.

What it measures, on the same real images for every row:

* held-out output cosine vs the FP32 original graph in onnxruntime (what vlmforge's `reference`
  stage records), worst sample and every sample, every graph run the same way: onnxruntime CPU,
  graph optimizations off (ORT's Q/DQ fusions change rounding and reject FP8);
* the TensorRT-RTX engine (SM 8.9, profile x 1x3x320x320 / 640x640 / 960x960): layers, compute
  layers (less the bookkeeping ones), bytes, and the share of GEMM/conv layers that run INT8/FP8;
  ratios of layers and bytes vs the vlmforge FP16 engine.

Rows: the FP32 original (upgraded to opset 19, the graph the other tools start from); vlmforge's
own builds through its CLI (``vlmforge build <cfg> --precision fp16|int8|fp8 --json``, target
rtx4090, artifacts under ``<work>/artifacts``: a rerun reuses its cache) with their default
settings (the mixed-precision search keeps sensitive layers FP16 to meet the accuracy budget; a
build whose quantize gate fails writes no graph: the row says "gate failed" with the cosine the
stage reported); ``quantize_static`` (QDQ, QInt8 activations and weights, symmetric, per-channel,
MinMax) with its default op set and with Conv/ConvTranspose/Gemm/MatMul only (TensorRT's
placement); ModelOpt INT8 and FP8 (``--calibration_method max --calibration_eps cpu
--high_precision_dtype fp32``), each as is and with its ``--simplify`` (this Paddle2ONNX export
keeps its conv weights in Constant nodes: ModelOpt INT8 then finds no weight shape and leaves every
Conv unquantized; --simplify folds them first), when its virtualenv exists. quantize_static's FP8
(QFLOAT8E4M3FN, Distribution calibration only) is off unless ``--ort-fp8``. The non-vlmforge
graphs keep FP32 outside the Q/DQ: that is what their users get, and the engine runs it so.

Same inputs everywhere. vlmforge's preprocessing (ImageNet mean/std, keep aspect, each side a
multiple of 32 in 320..960) is taken from the build itself: the held-out tensors and the FP32
outputs are the `reference` stage's (``reference.npz``: ``s{i}.pixel_values``,
``s{i}.vision_features``; per-sample noise floors from ``reference.json``). The calibration tensors
are made by vlmforge's own ``ImageFeeder`` over the calibration folder (the `calibrate` stage keeps
only its first two in ``feeds_vision.npz``; those two are checked to match exactly), and every
quantizer calibrates on all of them.

JSON: ``<work>/byo_real.json``; graphs, engines and layer reports under ``<work>/bench/<row>/``.

ModelOpt runs in its own virtualenv (/work/modelopt-venv; how to install it: the docstring of
bench/anchor_quantizers.py).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from anchor_quantizers import MODELOPT_PY, SECONDS, copy_graph, first_line, timed  # noqa: E402

TARGET, SM = "rtx4090", "8.9"
PRECISIONS = ("fp16", "int8", "fp8")
BASE = "vlmforge fp16"  # the engine the ratios divide by
PROFILE: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]] = {
    "x": ((1, 3, 320, 320), (1, 3, 640, 640), (1, 3, 960, 960))}
CONFIG = """name: {name}
model:
  vision_onnx: {{path: {model}, input_name: x, layout: NCHW, fit: keep-aspect, stride: 32,
                mean: [0.485, 0.456, 0.406], std: [0.229, 0.224, 0.225]}}
targets: [{target}]
precision: {{vision: {precision}}}
calibration: {{source: folder, images: {calibration}, samples: {cal_samples}}}
verify: {{images: {held_out}, samples: {held_samples}}}
profiles: {{vision: {{min_image: [320, 320], opt_image: [640, 640], max_image: [960, 960], max_images: 1}}}}
"""
Feeds = list[dict[str, np.ndarray]]


def log(t0: float, msg: str) -> None:
    print(f"[{time.perf_counter() - t0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def image_count(folder: Path) -> int:
    from stages.lib.qdq.calibset import image_files

    return len(image_files(folder))


# -- vlmforge: its own builds, through its CLI ----------------------------------------------------
def vlmforge_build(work: Path, name: str, model: Path, precision: str, cal: Path, held: Path) -> dict[str, Any]:
    """One `vlmforge build --json`; the run report (or the one-line reason there is none)."""
    cfg = work / "configs" / f"{name}.yaml"
    cfg.parent.mkdir(parents=True, exist_ok=True)
    cfg.write_text(CONFIG.format(name=name, model=model.resolve(), target=TARGET, precision=precision,
                                 calibration=cal.resolve(), cal_samples=image_count(cal),
                                 held_out=held.resolve(), held_samples=image_count(held)))
    env = {**os.environ, "VLMFORGE_ARTIFACTS": str(work / "artifacts")}
    cmd = [str(REPO / ".venv" / "bin" / "vlmforge"), "build", str(cfg), "--precision", precision, "--json"]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=1800)
    (work / "configs" / f"{name}.stderr.log").write_text(p.stderr)
    try:
        doc: dict[str, Any] = json.loads(p.stdout)
    except json.JSONDecodeError:
        report = work / "artifacts" / "runs" / name / "latest" / "report.json"
        if p.returncode == 1 and report.is_file():  # a failed build still writes its report
            doc = json.loads(report.read_text())
        else:
            lines = [ln for ln in p.stderr.splitlines() if ln.strip()] or ["no output"]
            return {"error": f"vlmforge build exit {p.returncode}: {lines[-1].strip()[:300]}"}
    return {"doc": doc, "out": work / "artifacts" / "out" / name, "exit": p.returncode}


def vlmforge_row(build: dict[str, Any], precision: str, dst: Path) -> tuple[dict[str, Any], Path | None]:
    """The row's status, what vlmforge itself reported, and a copy of its graph (None: no graph)."""
    row: dict[str, Any] = {"variant": f"vlmforge {precision}", "kind": "vlmforge", "precision": precision}
    if "error" in build:
        return row | {"status": "build error", "error": build["error"]}, None
    nodes = {n["id"]: n for n in build["doc"].get("nodes", [])}
    q, e, v = (nodes.get(f"{s}@{TARGET}", {}) for s in ("quantize", "engine", "verify"))
    vision = (q.get("metrics") or {}).get("vision") or {}
    said = ((vision.get("parity") or {}).get("vs_reference") or {}).get("cosine")
    row |= {"vlmforge_reported_cosine": said, "kept_high_precision": vision.get("kept"),
            "weights_share": vision.get("weights_share"), "build_result": build["doc"].get("result"),
            "build_seconds": build["doc"].get("wall_seconds"),
            "gates": [g for n in (q, e, v) for g in n.get("gates", [])]}
    failed = next((n for n in (q, e, v) if n.get("status") == "failed"), None)
    if q.get("status") == "failed":
        gate = "gate" in (q.get("error") or "")
        return row | {"status": "gate failed" if gate else "quantize failed", "error": first_line(q.get("error") or "?"),
                      "cosine_min": said}, None
    if failed is not None:
        row |= {"status": f"{failed['stage']} failed", "error": first_line(failed.get("error") or "?")}
    else:
        row["status"] = "ok" if build["doc"].get("result") == "ok" else str(build["doc"].get("result"))
    out: Path = build["out"]
    graph = out / f"quantize@{TARGET}" / "vision.onnx"
    if not graph.is_file():
        graph = out / "fuse" / "vision.onnx"
    sidecar = out / f"engine@{TARGET}" / "vision.engine.json"
    if sidecar.is_file():
        s = json.loads(sidecar.read_text())
        lay = s.get("layers") or {}
        row["engine"] = {"bytes": s.get("bytes"), "layers": lay.get("layers"), "compute_layers": lay.get("compute_layers"),
                         "low_precision_share": lay.get("low_precision_share"), "conv_layers": lay.get("conv_layers"),
                         "source": "vlmforge engine stage (vision.engine.json)", "profile": s.get("profile")}
    return row, copy_graph(graph, dst)


# -- the inputs: vlmforge's own tensors -----------------------------------------------------------
def held_out_set(out: Path) -> tuple[Feeds, list[np.ndarray], list[float | None], list[str]]:
    """Held-out feeds (x), the FP32 original's outputs, per-sample noise-floor cosines, image names."""
    ref = out / "reference"
    meta = json.loads((ref / "reference.json").read_text())
    with np.load(ref / "reference.npz", allow_pickle=False) as z:
        n = len({k.split(".", 1)[0] for k in z.files})
        feeds = [{"x": np.asarray(z[f"s{i}.pixel_values"], np.float32)} for i in range(n)]
        refs = [np.asarray(z[f"s{i}.vision_features"], np.float32) for i in range(n)]
    samples = meta.get("samples") or [{} for _ in range(n)]
    floors = [(s.get("noise_floor") or {}).get("cosine") for s in samples]
    return feeds, refs, floors, [str(s.get("image", f"s{i}")) for i, s in enumerate(samples)]


def calibration_set(out: Path, cal: Path) -> tuple[Feeds, str]:
    """Every calibration image, preprocessed by vlmforge's ImageFeeder as its `calibrate` stage
    does; checked against the first feeds that stage kept."""
    from stages.lib.qdq import heldout
    from stages.lib.qdq.calibset import ImageFeeder, folder_samples

    feeder = ImageFeeder(json.loads((out / "fuse" / "vision.json").read_text()))
    feeds = [{"x": feeder.vision(s)[0][feeder.name]} for s in folder_samples(cal, None, image_count(cal), None)]
    kept = heldout.load_feeds(out / "calibrate" / "feeds_vision.npz")
    same = all(np.array_equal(k[feeder.name], f["x"]) for k, f in zip(kept, feeds, strict=False))
    if not kept or not same:
        return [{"x": k[feeder.name]} for k in kept], (
            f"own preprocessing differs from calibrate's feeds_vision.npz: using its {len(kept)} kept feeds")
    return feeds, f"{len(feeds)} images ({len(kept)} checked equal to calibrate's feeds_vision.npz)"


def fp32_opset19(model: Path, dst: Path) -> Path:
    import onnx
    from onnx import version_converter

    m = onnx.load(str(model))
    dst.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(version_converter.convert_version(m, 19), str(dst))
    return dst


# -- the other quantizers -------------------------------------------------------------------------
def ort_static(src: Path, calib: Feeds, dst: Path, mode: str, ops: list[str] | None) -> dict[str, Any]:
    import onnxruntime.quantization as Q

    class Reader(Q.CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(calib)

        def get_next(self) -> dict[str, Any] | None:
            return next(self.it, None)

    qt = Q.QuantType.QInt8 if mode == "int8" else Q.QuantType.QFLOAT8E4M3FN
    method = Q.CalibrationMethod.MinMax if mode == "int8" else Q.CalibrationMethod.Distribution
    dst.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.redirect_stdout(sys.stderr):  # its calibrators print progress: stdout is the table's
        Q.quantize_static(str(src), str(dst), Reader(), quant_format=Q.QuantFormat.QDQ, per_channel=True,
                          activation_type=qt, weight_type=qt, op_types_to_quantize=ops, calibrate_method=method,
                          extra_options={"ActivationSymmetric": True, "WeightSymmetric": True})
    return {"note": f"quantize_static {mode}, {method.name} calibration" + (f", ops {'/'.join(ops)}" if ops else "")}


def modelopt(src: Path, calib: Feeds, dst: Path, mode: str, simplify: bool) -> dict[str, Any]:
    """ModelOpt's ONNX PTQ CLI on its own copy (it rewrites --onnx_path), as bench/anchor_quantizers.py
    runs it; its calibration data is each input stacked along axis 0, one step's shape in
    --calibration_shapes (so it takes the feeds of the first feed's shape only). ``simplify``: its
    --simplify (onnxslim first), which folds Paddle2ONNX's Constant-node weights into initializers:
    without it ModelOpt INT8 finds no weight shape and skips every Conv ("unsupported Conv nodes")."""
    if not MODELOPT_PY.is_file():
        raise RuntimeError(f"ModelOpt: not installed ({MODELOPT_PY}; how to install: bench/anchor_quantizers.py docstring)")
    model, data = copy_graph(src, dst.parent / "src"), dst.parent / "calib.npz"
    same = [f for f in calib if all(f[k].shape == calib[0][k].shape for k in f)]
    np.savez(data, **{k: np.concatenate([f[k] for f in same], 0) for k in same[0]})  # type: ignore[arg-type]
    shapes = ",".join(f"{k}:{'x'.join(map(str, v.shape))}" for k, v in same[0].items())
    cmd = [str(MODELOPT_PY), "-m", "modelopt.onnx.quantization", "--onnx_path", str(model), "--quantize_mode", mode,
           "--calibration_data_path", str(data), "--calibration_shapes", shapes, "--calibration_method", "max",
           "--calibration_eps", "cpu", "--high_precision_dtype", "fp32", "--output_path", str(dst),
           *(["--simplify"] if simplify else [])]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=dst.parent)
    (dst.parent / "modelopt.log").write_text(p.stdout + p.stderr)
    if p.returncode != 0 or not dst.is_file():
        lines = [ln for ln in p.stderr.splitlines() if "rror" in ln] or p.stderr.splitlines() or ["?"]
        raise RuntimeError(f"ModelOpt exit {p.returncode}: {lines[-1].strip()[:300]}")
    version = subprocess.run([str(MODELOPT_PY), "-c", "import modelopt; print(modelopt.__version__)"],
                             capture_output=True, text=True).stdout.strip()
    skipped = [ln.split("Found ", 1)[1].split(" unsupported")[0] for ln in (p.stdout + p.stderr).splitlines()
               if "unsupported Conv nodes" in ln and "Found " in ln]
    return {"note": f"ModelOpt {version} {mode}, max calibration on {len(same)} feeds, high precision fp32"
            + (", --simplify" if simplify else "") + (f"; it excluded {skipped[-1]} Conv nodes as unsupported" if skipped else "")}


# -- the measurements -----------------------------------------------------------------------------
def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """As `stages.lib.parity.metrics.compare`: float64 over the flattened tensors."""
    x, y = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    if not np.isfinite(x).all():
        return float("nan")
    nx, ny = float(np.linalg.norm(x)), float(np.linalg.norm(y))
    return 1.0 if nx == ny == 0.0 else (0.0 if nx == 0.0 or ny == 0.0 else float(np.dot(x, y) / (nx * ny)))


def score(path: Path, feeds: Feeds, refs: list[np.ndarray]) -> list[float]:
    """Per-sample cosine of the graph's output vs the FP32 original's, onnxruntime CPU, optimizations off."""
    from stages.lib.ortsession import ort_session
    from stages.lib.qdq.calibset import cast_feed

    sess = ort_session(path, optimization="none")
    name = sess.get_outputs()[0].name
    out = []
    for f, r in zip(feeds, refs, strict=True):
        got = np.asarray(sess.run([name], cast_feed(sess, f))[0], np.float32)
        out.append(cosine(got.reshape(r.shape) if got.size == r.size else got, r))
    return out


def engine(path: Path, profile: Any) -> dict[str, Any]:
    from stages.lib.trt.backend import resolve_backend
    from stages.lib.trt.builder import BuildOptions, build_engine
    from stages.lib.trt.layer_report import onnx_op_types, report_from_log

    built = build_engine(resolve_backend("tensorrt-rtx", SM), path, path.with_suffix(".engine"), SM, profile,
                         BuildOptions(), None, "vision")
    s = report_from_log(built.log, onnx_op_types(path))
    path.with_suffix(".layers.json").write_text(json.dumps(s.as_dict(), indent=1))
    return {"bytes": built.bytes, "layers": s.layers, "compute_layers": s.compute_layers,
            "low_precision_share": s.low_precision_share, "conv_layers": s.conv_layers,
            "gemm_conv_precisions": s.gemm_conv_precisions, "source": "built here (stages.lib.trt.builder)",
            "seconds": round(built.seconds, 2)}


def measure(row: dict[str, Any], path: Path | None, held: tuple[Feeds, list[np.ndarray]], profile: Any) -> dict[str, Any]:
    """Held-out cosines, then the engine (unless vlmforge's own sidecar gave it). A failing step is
    the row's one-line error, never a crash."""
    if path is None:
        return row
    try:
        with timed("held-out runs"):
            cos = score(path, *held)
        row |= {"cosines": cos, "cosine_min": min(cos)}
        if bad := sum(not np.isfinite(c) for c in cos):
            row |= {"status": "non-finite", "cosine_min": float("nan"),
                    "error": f"held-out output non-finite (NaN/inf) on {bad} of {len(cos)} samples"}
    except Exception as e:  # noqa: BLE001 - a graph ORT cannot run is a result
        row["error"] = f"held-out run: {type(e).__name__}: {first_line(e)}"
    if "engine" not in row:
        try:
            with timed("engines"):
                row["engine"] = engine(path, profile)
        except Exception as e:  # noqa: BLE001
            row["engine_error"] = first_line(e)
    return row


def other_row(variant: str, fn: Any, dst: Path, held: tuple[Feeds, list[np.ndarray]], profile: Any) -> dict[str, Any]:
    row: dict[str, Any] = {"variant": variant, "kind": "other"}
    try:
        with timed(f"quantize: {variant.split(' ')[0]}"):
            t = time.perf_counter()
            row |= fn(dst) or {}
            row["quantize_s"] = round(time.perf_counter() - t, 1)
    except Exception as e:  # noqa: BLE001 - a quantizer that fails is a result
        msg = first_line(e) if isinstance(e, RuntimeError) else f"{type(e).__name__}: {first_line(e)}"
        return row | {"status": "failed", "error": msg}
    return measure(row | {"status": "ok"}, dst, held, profile)


# -- the table ------------------------------------------------------------------------------------
def fmt(v: Any, spec: str) -> str:
    return "-" if v is None or (isinstance(v, float) and np.isnan(v)) else format(v, spec)


def print_table(rows: list[dict[str, Any]], floors: list[float | None], names: list[str]) -> None:
    base = next((r.get("engine") for r in rows if r["variant"] == BASE), None) or {}
    cols = (("variant", 40, "<"), ("status", 12, "<"), ("min cos", 8, ">"), ("per-sample cos", 26, "<"),
            ("compute", 7, ">"), ("layers", 6, ">"), ("MB", 6, ">"), ("lowp", 5, ">"), ("layers x", 8, ">"),
            ("bytes x", 7, ">"))
    print("  ".join(f"{c:{a}{w}}" for c, w, a in cols))
    print("  ".join("-" * w for _, w, _ in cols))
    for r in rows:
        e = r.get("engine") or {}
        per = " ".join(fmt(c, ".5f") for c in r.get("cosines", [])) or "-"
        lx = e["layers"] / base["layers"] if e.get("layers") and base.get("layers") else None
        bx = e["bytes"] / base["bytes"] if e.get("bytes") and base.get("bytes") else None
        cells = (r["variant"], r.get("status", "-"), fmt(r.get("cosine_min"), ".5f"), per, fmt(e.get("compute_layers"), "d"),
                 fmt(e.get("layers"), "d"), fmt(e["bytes"] / 1e6 if e.get("bytes") else None, ".2f"),
                 fmt(e.get("low_precision_share"), ".2f"), fmt(lx, ".2f"), fmt(bx, ".2f"))
        print("  ".join(f"{c:{a}{w}}" for c, (_, w, a) in zip(cells, cols, strict=True)).rstrip())
        notes = [r.get("error"), r.get("engine_error") and f"engine: {r['engine_error']}", r.get("note")]
        if r.get("kind") == "vlmforge" and r.get("vlmforge_reported_cosine") is not None:
            notes.append(f"vlmforge's quantize stage reported held-out cosine {r['vlmforge_reported_cosine']:.5f}"
                         + (f", {r['kept_high_precision']} conv groups kept FP16" if r.get("kept_high_precision") else "")
                         + (f", quantized weight share {r['weights_share']:.3f}" if r.get("weights_share") is not None else ""))
        for note in filter(None, notes):
            print(f"{'':<4}^ {note}")
    print(f"{'noise floor (vlmforge, per sample)':<40}  {'':<12}  {fmt(min((f for f in floors if f is not None), default=None), '.5f'):>8}"
          f"  {' '.join(fmt(f, '.5f') for f in floors)}")
    print(f"\nheld-out samples (in order): {', '.join(names)}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/byo_bench"), help="work folder (artifacts, graphs, JSON)")
    ap.add_argument("--model", type=Path, default=None,
                    help="the ONNX detector (default: PPOCR_DET.fetch from tests/real_models.py, else /tmp/det/det.onnx)")
    ap.add_argument("--calibration", type=Path, default=None, help="calibration images folder (default: rendered pages)")
    ap.add_argument("--held-out", type=Path, default=None, help="held-out images folder (default: pages + a real scan)")
    ap.add_argument("--name", default="byo_det", help="vlmforge config name prefix (<name>_<precision>)")
    ap.add_argument("--ort-fp8", action="store_true", help="also try quantize_static FP8 (Distribution calibration)")
    ap.add_argument("--no-modelopt", action="store_true", help="skip the ModelOpt rows")
    a = ap.parse_args()
    t0 = time.perf_counter()
    work: Path = a.work.resolve()
    bench = work / "bench"
    shutil.rmtree(bench, ignore_errors=True)  # graphs and engines: fresh each run (the artifacts cache stays)
    bench.mkdir(parents=True)

    model_note = ""
    if a.model is None:
        from tests.real_models import PPOCR_DET

        try:
            a.model = PPOCR_DET.fetch(work / "model")
            model_note = f"{PPOCR_DET.package} {PPOCR_DET.member}"
        except Exception as e:  # noqa: BLE001 - no registry: the local copy
            a.model, model_note = Path("/tmp/det/det.onnx"), f"fetch failed ({first_line(e)}): /tmp/det/det.onnx"
    model: Path = a.model.resolve()
    log(t0, f"model {model} {model_note}")
    if a.calibration is None or a.held_out is None:
        from tests.real_models import PAGE_SCAN, render_page

        if a.calibration is None:
            a.calibration = work / "images" / "cal"
            for i in range(4):
                render_page(a.calibration / f"doc{i}.png", seed=i)
        if a.held_out is None:
            a.held_out = work / "images" / "held"
            for i in range(2):
                render_page(a.held_out / f"page{i}.png", seed=100 + i)
            shutil.copyfile(PAGE_SCAN.fetch(work / "model"), a.held_out / "scan.png")

    builds: dict[str, dict[str, Any]] = {}
    for p in PRECISIONS:
        with timed(f"vlmforge build {p}"):
            builds[p] = vlmforge_build(work, f"{a.name}_{p}", model, p, a.calibration, a.held_out)
        log(t0, f"vlmforge build {p}: {builds[p].get('error') or builds[p]['doc'].get('result')}")
    out = next((b["out"] for b in builds.values() if "out" in b and (b["out"] / "reference").exists()), None)
    if out is None:
        print("no vlmforge build produced a reference stage: " + "; ".join(str(b.get("error")) for b in builds.values()))
        return 1
    feeds, refs, floors, names = held_out_set(out)
    calib, calib_note = calibration_set(out, a.calibration)
    held = (feeds, refs)
    fp16_side = out.parent / f"{a.name}_fp16" / f"engine@{TARGET}" / "vision.engine.json"
    profile = PROFILE
    if fp16_side.is_file() and (prof := json.loads(fp16_side.read_text()).get("profile")):
        profile = {k: (tuple(v["min"]), tuple(v["opt"]), tuple(v["max"])) for k, v in prof.items()}
    log(t0, f"held-out {len(feeds)} ({', '.join(names)}), calibration {calib_note}")

    with timed("opset 19 upgrade"):
        fp32 = fp32_opset19(model, bench / "fp32" / "vision.onnx")
    rows = [measure({"variant": "FP32 original (opset 19)", "kind": "other", "status": "ok"}, fp32, held, profile)]
    log(t0, rows[-1]["variant"])
    for p in PRECISIONS:
        row, graph = vlmforge_row(builds[p], p, bench / f"vlmforge-{p}")
        rows.append(measure(row, graph, held, profile))
        log(t0, f"{row['variant']}: {row.get('status')}")
    gemm_ops = ["Conv", "ConvTranspose", "Gemm", "MatMul"]
    others: list[tuple[str, str, Any]] = [
        ("ORT quantize_static int8 (default ops)", "ort-int8",
         lambda d: ort_static(fp32, calib, d, "int8", None)),
        ("ORT quantize_static int8 (Conv/Gemm)", "ort-int8-gemm",
         lambda d: ort_static(fp32, calib, d, "int8", gemm_ops))]
    if a.ort_fp8:
        others.append(("ORT quantize_static fp8 (default ops)", "ort-fp8", lambda d: ort_static(fp32, calib, d, "fp8", None)))
    if not a.no_modelopt:
        others += [(f"ModelOpt {m} (max{', --simplify' if simp else ''})", f"modelopt-{m}{'-simplify' if simp else ''}",
                    lambda d, m=m, simp=simp: modelopt(fp32, calib, d, m, simp)) for m in ("int8", "fp8") for simp in (False, True)]
    for variant, folder, fn in others:
        rows.append(other_row(variant, fn, bench / folder / "vision.onnx", held, profile))
        log(t0, f"{variant}: {rows[-1].get('error') or rows[-1].get('status')}")
    if not a.ort_fp8:
        rows.append({"variant": "ORT quantize_static fp8", "kind": "other", "status": "skipped",
                     "note": "not run (--ort-fp8 tries QFLOAT8E4M3FN; ORT allows only Distribution calibration for it)"})
    total = time.perf_counter() - t0

    print(f"\nmodel: {model}{f' ({model_note})' if model_note else ''}\nheld-out: {a.held_out} ({len(feeds)} samples, "
          f"vlmforge reference.npz); calibration: {a.calibration} ({calib_note})\ncosine: output vs the FP32 original, "
          "onnxruntime CPU, optimizations off; engines: TensorRT-RTX SM 8.9, profile "
          + ", ".join(f"{k} {'/'.join('x'.join(map(str, s)) for s in v)}" for k, v in profile.items())
          + "; compute: engine layers less bookkeeping; lowp: GEMM/conv layers in INT8/FP8; "
          f"layers x, bytes x: vs the {BASE} engine\n")
    print_table(rows, floors, names)
    print("\nwall time: " + ", ".join(f"{k} {v:.1f}s" for k, v in SECONDS.items()) + f"; total {total:.1f}s")
    (work / "byo_real.json").write_text(json.dumps(
        {"model": str(model), "model_note": model_note, "calibration": str(a.calibration), "calibration_note": calib_note,
         "held_out": str(a.held_out), "held_out_images": names, "noise_floor_cosines": floors,
         "profile": {k: [list(s) for s in v] for k, v in profile.items()}, "rows": rows,
         "stage_seconds": SECONDS, "total_seconds": total}, indent=1, default=str))
    print(f"JSON: {work / 'byo_real.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
