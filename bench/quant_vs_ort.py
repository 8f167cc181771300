"""Our INT8 Q/DQ graphs vs onnxruntime.quantization.quantize_static on the same graphs and data.

    .venv/bin/python bench/quant_vs_ort.py [--config configs/default.yaml] [--work DIR] [--dtype fp32]

Builds the upstream stages (checkpoint, export_vision, export_decoder, fuse, reference) with the
real stage code into --work, then for each graph quantizes the *same* fused graph with the *same*
calibration samples three ways: ours (TensorRT placement, symmetric, per-channel weights, max
calibration), ORT quantize_static QDQ per-channel with its defaults (U8 asymmetric activations),
ORT with S8 symmetric activations (the TensorRT-compatible setting), and the same restricted to
Conv/Gemm/MatMul (its strongest setting here). Parity is on the
reference stage's held-out set against the unquantized graph and PyTorch, all in onnxruntime
with optimizations disabled. fp32 graphs by default: quantize_static calibrates fp32 models.

Model-Optimizer (`nvidia-modelopt[onnx]`) is not a column: on this CPU-only box pip resolves it
to onnxruntime-gpu + cupy-cuda12x (CUDA wheels) and a downgraded onnx, replacing the CPU stack.
"""

from __future__ import annotations

import argparse
import importlib
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def run_stage(name: str, cfg: Any, work: Path) -> Path:
    from pipeline.stage import GateFailed, StageContext, StageError, missed_message

    st = importlib.import_module(f"stages.{name}").STAGE
    out = work / name
    if (out / ".done").is_file():
        return out
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    ctx = StageContext(node_id=name, params=st.params(cfg, None), inputs={d: work / d for d in st.deps}, out=out,
                       target=None, external=st.external(cfg) if st.external else [])
    try:
        res = st.run(ctx)
        if (missed := missed_message(res.gates)) is not None:  # the worker's rule: a missed gate fails
            raise GateFailed(missed, res)
    except StageError as e:
        if name != "fuse":
            raise
        # fusion is an optimization: the bench compares quantizers, so the exported graphs do
        print(f"fuse failed ({str(e)[:160]}); using the exported graphs", file=sys.stderr)
        for d in ("export_vision", "export_decoder"):
            for f in (work / d).iterdir():
                shutil.copy2(f, out / f.name)
    (out / ".done").write_text("")
    return out


def calibration_feeds(cfg: Any, work: Path) -> dict[str, list[dict[str, np.ndarray]]]:
    """The calibration set (as the calibrate stage builds it) as explicit feeds per graph."""
    from stages.calibrate import _params, samples
    from stages.lib.checkpoints.local import resolve_checkpoint
    from stages.lib.qdq import graphio
    from stages.lib.qdq.calibset import Feeder, cast_feed

    ckpt, family = resolve_checkpoint(work / "checkpoint")
    p = _params(cfg, None)
    feeder = Feeder(ckpt, family, int(p["prompt_len"]), graphio.session(work / "fuse" / "embed.onnx"))
    vs = graphio.session(work / "fuse" / "vision.onnx")
    ds = graphio.session(work / "fuse" / "decoder.onnx")
    feeds: dict[str, list[dict[str, np.ndarray]]] = {"vision": [], "decoder": []}
    for s in samples(p):
        vf, grid = feeder.vision(s)
        vf = cast_feed(vs, vf)
        vout = graphio.run(vs, vf)
        feeds["vision"].append(vf)
        feeds["decoder"].append(cast_feed(ds, feeder.decoder(s, grid, vout, ds.get_inputs())))
    return feeds


def ours(src: Path, feeds: list[dict[str, np.ndarray]], dst: Path) -> dict[str, Any]:
    import onnx

    from stages.lib.qdq import calibrators as C
    from stages.lib.qdq import graphio
    from stages.lib.qdq.recipe import Calib, Recipe, build

    model = graphio.load(src)
    col, sess = C.make_collector(model)
    for f in feeds:
        col.update(graphio.run(sess, f, col.names))
    calib = Calib.from_ranges({"tensors": col.ranges("max"), "order": col.names}, col.arrays())
    built = build(onnx.shape_inference.infer_shapes(onnx.load(str(src))), Recipe("int8"), calib)
    graphio.check(built.model)
    graphio.save(built.model, dst)
    return {"qdq_pairs": built.stats["qdq_pairs"], "weight_dq": built.stats["weight_dq"]}


def ort_static(src: Path, feeds: list[dict[str, np.ndarray]], dst: Path, symmetric: bool,
               gemms_only: bool = False) -> dict[str, Any]:
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(feeds)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.it, None)

    act = QuantType.QInt8 if symmetric else QuantType.QUInt8
    extra = {"ActivationSymmetric": True, "WeightSymmetric": True} if symmetric else {}
    ops = ["Conv", "ConvTranspose", "Gemm", "MatMul"] if gemms_only else None
    quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=act, weight_type=QuantType.QInt8, extra_options=extra, op_types_to_quantize=ops)
    m = onnx.load(str(dst))
    return {"qdq_pairs": sum(n.op_type == "QuantizeLinear" for n in m.graph.node),
            "weight_dq": sum(n.op_type == "DequantizeLinear" for n in m.graph.node)
            - sum(n.op_type == "QuantizeLinear" for n in m.graph.node)}


def held_out(work: Path, graph: str) -> tuple[list[dict[str, np.ndarray]], list[dict[str, np.ndarray]], str]:
    from stages.lib.checkpoints.local import resolve_checkpoint
    from stages.lib.qdq import graphio, heldout
    from stages.lib.qdq.calibset import Feeder
    from stages.lib.reference_io import load_reference

    ckpt, family = resolve_checkpoint(work / "checkpoint")
    feeder = Feeder(ckpt, family, 8, graphio.session(work / "fuse" / "embed.onnx"))
    _, samples = load_reference(work / "reference")
    if graph == "vision":
        feeds = heldout.vision_feeds(samples, feeder.vspec)
        out = graphio.session(work / "fuse" / "vision.onnx").get_outputs()[0].name
    else:
        feeds = heldout.decoder_feeds(samples, graphio.session(work / "fuse" / "decoder.onnx").get_inputs(),
                                      feeder.tspec)
        out = "logits"
    return feeds, samples, out


def score(path: Path, graph: str, feeds: Any, samples: Any, out: str, fp_outs: Any) -> dict[str, Any]:
    from stages.lib.qdq import heldout

    outs = heldout.run_all(path, feeds, [out])
    logits = graph == "decoder"
    r = {"vs_unquantized": heldout.parity(outs, fp_outs, out, logits)}
    t = heldout.torch_refs(graph, samples, out)
    if t is not None:
        r["vs_pytorch"] = heldout.parity(outs, t, out, logits)
    return r


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(REPO / "configs" / "default.yaml"))
    ap.add_argument("--work", default=str(REPO / "artifacts" / "bench" / "quant_vs_ort"))
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "fp16"])
    ap.add_argument("--json", default=None, help="write the results here too")
    a = ap.parse_args()
    from pipeline.config_io import load_config
    from stages.lib.qdq import heldout

    cfg = load_config(a.config)
    cfg = cfg.model_copy(update={"export": cfg.export.model_copy(update={"dtype": a.dtype})})
    work = Path(a.work) / a.dtype
    work.mkdir(parents=True, exist_ok=True)
    for name in ("checkpoint", "export_vision", "export_decoder", "fuse", "reference"):
        t = time.time()
        run_stage(name, cfg, work)
        print(f"{name}: {time.time() - t:.1f}s", file=sys.stderr)
    cal = calibration_feeds(cfg, work)
    results: dict[str, Any] = {"config": a.config, "dtype": a.dtype, "calibration_samples": len(cal["vision"])}
    for graph in ("vision", "decoder"):
        src = work / "fuse" / f"{graph}.onnx"
        feeds, samples, out = held_out(work, graph)
        fp_outs = heldout.run_all(src, feeds, [out])
        row: dict[str, Any] = {}
        for label in ("ours_int8", "ort_static_u8asym", "ort_static_s8sym", "ort_static_s8sym_gemms"):
            dst = work / f"{graph}.{label}.onnx"
            try:
                if label == "ours_int8":
                    info = ours(src, cal[graph], dst)
                else:
                    info = ort_static(src, cal[graph], dst, symmetric="s8sym" in label, gemms_only="gemms" in label)
                row[label] = {**info, **score(dst, graph, feeds, samples, out, fp_outs)}
            except Exception as e:  # noqa: BLE001 - a failing competitor is a result, not a crash
                row[label] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
        results[graph] = row
    print(f"{'graph':8} {'quantizer':20} {'QDQ':>4} {'cos(fp)':>9} {'top1(fp)':>8} {'cos(pt)':>9} {'top1(pt)':>8}")
    for graph in ("vision", "decoder"):
        for label, r in results[graph].items():
            if "error" in r:
                print(f"{graph:8} {label:20} error: {r['error']}")
                continue
            u, pt = r["vs_unquantized"], r.get("vs_pytorch", {})
            print(f"{graph:8} {label:20} {r['qdq_pairs']:>4} {u['cosine']:9.6f} {u.get('top1', float('nan')):8.3f} "
                  f"{pt.get('cosine', float('nan')):9.6f} {pt.get('top1', float('nan')):8.3f}")
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2))
    ok = all(results[g]["ours_int8"]["vs_unquantized"]["cosine"] + 1e-4
             >= max(r["vs_unquantized"]["cosine"] for k, r in results[g].items() if "error" not in r)
             for g in ("vision", "decoder") if "error" not in results[g]["ours_int8"])
    print("ours at least as accurate as quantize_static:", ok)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
