"""vlmforge's Q/DQ graphs vs onnxruntime `quantize_static` vs NVIDIA ModelOpt ONNX PTQ, one run.

    .venv/bin/python bench/anchors.py [--config configs/default.yaml] [--graphs vision decoder] [--modes int8 fp8]

Reads the pipeline's cached nodes (run `make engines` first), found with `vlmforge plan --json`:
the fused FP16 graphs (`fuse`), calibration feeds and ranges (`calibrate`), the held-out set and
PyTorch's outputs (`reference`), vlmforge's graphs (`quantize@rtx3090` INT8, `quantize@rtx4090` FP8).
Every quantizer starts from the same fused graph and calibration feeds. Per row: the quantized
share of GEMM/conv weights, held-out cosine vs PyTorch (worst sample) and the error ratio
(1-cos)/(1-cos of vlmforge all quantized); for the decoder, next-token agreement at the decisive
positions (`metrics.decisive_top1`, noise = `export_noise(fuse)`) and at every position pooled
(`topk_agreement`); the TensorRT-RTX engine (the project's builder and profiles, SM 8.6 INT8 /
8.9 FP8): layers, share of GEMM/conv layers in INT8/FP8, bytes and bytes ratio. Rows: the
unquantized graph; vlmforge with its default mixed-precision search (groups kept FP16) and with
it off (every site quantized: equal bits); quantize_static with its default op set and with
Conv/Gemm/MatMul only; ModelOpt. JSON: artifacts/bench/anchors.json; graphs, engines and layer
reports under artifacts/bench/anchors/<graph>.<mode>/<row>/.

Choices. Held-out runs in onnxruntime CPU with optimizations off (`heldout.run_all`: ORT's Q/DQ
fusions reject FP8 and change rounding, docs/FIELD_NOTES.md §3). Symmetric activations, per-channel
weights, max calibration everywhere: TensorRT takes symmetric Q/DQ only (FIELD_NOTES §2.1), max is
what vlmforge calibrates with. quantize_static gets an FP32 copy: on FP16 graphs it writes FP32
scales onto FP16 tensors, which ORT then rejects. It refuses MinMax for FP8 ("Only Distribution
calibration method is supported"), so FP8 rows use Distribution, and the row says so; its histograms
fail on the attention mask's -FLT_MAX fill ("Too many bins"), as ModelOpt's default entropy
calibration does: ModelOpt runs `--calibration_method max --calibration_eps cpu`. Each tool gets
its own copy of the graph, because ModelOpt rewrites its `--onnx_path` in place.

ModelOpt runs in its own virtualenv (how to install it: bench/anchor_quantizers.py).
"""

from __future__ import annotations

import argparse
import json
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
from anchor_quantizers import SECONDS, copy_graph, first_line, modelopt, ort_static, timed  # noqa: E402

TARGETS = {"int8": "rtx3090", "fp8": "rtx4090"}  # SM 8.6 / 8.9
BASE = "vlmforge (all quantized)"  # the equal-bits row the ratios divide by
# row label -> its folder under artifacts/bench/anchors/<graph>.<mode>/
ROWS = {"unquantized FP16 graph": "fp16", "vlmforge (default search)": "vlmforge-default", BASE: "vlmforge-all",
        "ORT quantize_static (all ops)": "ort-all", "ORT quantize_static (Conv/Gemm/MatMul)": "ort-gemms",
        "ModelOpt (max)": "modelopt"}
Feeds = list[dict[str, Any]]


# -- inputs: the cached nodes ---------------------------------------------------------------------
def cached_outputs(config: Path, modes: list[str]) -> dict[str, Path]:
    """node id -> its cached `out/` folder, from `vlmforge plan --json`."""
    rows = json.loads(subprocess.run([str(REPO / ".venv/bin/vlmforge"), "plan", str(config), "--json"],
                                     check=True, capture_output=True, text=True, cwd=REPO).stdout)
    found = {r["id"]: REPO / "artifacts" / "cache" / str(r["key"]) / "out" for r in rows if r["cached"]}
    need = ["checkpoint", "fuse", "calibrate", "reference", *(f"quantize@{TARGETS[m]}" for m in modes)]
    if missing := [n for n in need if n not in found]:
        raise SystemExit(f"not cached: {', '.join(missing)}: run `make engines` first")
    return found


def held_out(nodes: dict[str, Path], graph: str, trust: bool) -> tuple[Feeds, Feeds, str]:
    """Held-out feeds, PyTorch's outputs and the scored output, built the way stages/quantize.py builds them."""
    import onnx

    from stages.lib.checkpoints.local import resolve_checkpoint
    from stages.lib.qdq import heldout
    from stages.lib.qdq.calibset import Feeder
    from stages.lib.reference_io import load_reference
    from stages.lib.segments.runner import graph_inputs

    _, samples = load_reference(nodes["reference"])
    feeder = Feeder(*resolve_checkpoint(nodes["checkpoint"]), 8, None, trust_remote_code=trust)
    src = nodes["fuse"] / f"{graph}.onnx"
    if graph == "vision":
        feeds = heldout.vision_feeds(samples, feeder.vspec)
        output = onnx.load(str(src), load_external_data=False).graph.output[0].name
    else:
        feeds, output = heldout.decoder_feeds(samples, graph_inputs(src), feeder.tspec), "logits"
    if (refs := heldout.torch_refs(graph, samples, output)) is None:
        raise SystemExit(f"{nodes['reference']}: the held-out set has no PyTorch outputs for {graph}")
    return feeds, refs, output


# -- the quantizers -------------------------------------------------------------------------------
def vlmforge_all(nodes: dict[str, Path], graph: str, mode: str, dst: Path) -> dict[str, Any]:
    """vlmforge's recipe without the sensitivity fallback: every site the rules place is quantized."""
    import onnx_ir as ir

    from stages.lib.qdq import graphio
    from stages.lib.qdq.recipe import Calib, Recipe, build, weight_share

    source = graphio.load_proto(nodes["fuse"] / f"{graph}.onnx", in_file=True)
    built = build(source, Recipe(mode), Calib.load(nodes["calibrate"] / f"ranges_{graph}.json"))
    dst.parent.mkdir(parents=True, exist_ok=True)
    graphio.save(built.model, dst)
    return {"weight_share": weight_share(ir.from_proto(source).graph, built.placement, built.stats)["share"]}


def quantized(label: str, graph: str, mode: str, nodes: dict[str, Path], calib: Feeds, d: Path) -> tuple[Path, dict[str, Any]]:
    """Row ``label``'s graph, written as ``d/<graph>.onnx`` with its notes. Every row has its own
    copy, because the engine is written beside its graph and must never land in the cache."""
    src, out = nodes["fuse"] / f"{graph}.onnx", d / f"{graph}.onnx"
    if label == "unquantized FP16 graph":
        return copy_graph(src, d), {}
    if label == "vlmforge (default search)":
        q = nodes[f"quantize@{TARGETS[mode]}"]
        return copy_graph(q / f"{graph}.onnx", d), {
            "weight_share": json.loads((q / "quantize.json").read_text())[graph]["weights"]["share"]}
    if label == BASE:
        return out, vlmforge_all(nodes, graph, mode, out)
    if label.startswith("ORT"):
        return out, ort_static(src, calib, mode, out, gemms="Conv/Gemm/MatMul" in label)
    return out, modelopt(src, calib, mode, out)


# -- the measurements -----------------------------------------------------------------------------
def weight_share_of(path: Path) -> float:
    """Share of Conv/Gemm/MatMul constant weights, by element count, that reach the op through a
    DequantizeLinear."""
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    sizes = {t.name: int(np.prod(t.dims)) for t in m.graph.initializer}
    sizes |= {n.output[0]: int(np.prod(a.t.dims)) for n in m.graph.node if n.op_type == "Constant" for a in n.attribute}
    producer = {o: n for n in m.graph.node for o in n.output if n.op_type != "Constant"}
    total = quant = 0
    for n in (n for n in m.graph.node if n.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul")):
        name, dq = n.input[1], False
        while name not in sizes and (p := producer.get(name)) is not None and p.op_type in (
                "QuantizeLinear", "DequantizeLinear", "Cast", "Transpose", "Reshape", "Identity"):
            dq, name = dq or p.op_type == "DequantizeLinear", p.input[0]
        if name in sizes:
            total, quant = total + sizes[name], quant + (sizes[name] if dq else 0)
    return quant / total if total else 0.0


def score(path: Path, held: tuple[Feeds, Feeds, str], logits: bool, noise: float) -> dict[str, Any]:
    from stages.lib.parity.metrics import topk_agreement
    from stages.lib.qdq import heldout

    feeds, refs, output = held
    outs = heldout.run_all(path, feeds, [output])
    par = heldout.parity(outs, refs, output, logits, noise)  # top1: decisive_top1, pooled
    if logits:
        vocab = refs[0][output].shape[-1]
        got, ref = (np.concatenate([np.asarray(x[output], np.float32).reshape(-1, vocab) for x in xs]) for xs in (outs, refs))
        par["top1_all_pooled"] = topk_agreement(got, ref)
    return par


def engine(path: Path, graph: str, mode: str, ctx: dict[str, Any]) -> dict[str, Any]:
    from stages.lib.trt.builder import build_engine
    from stages.lib.trt.layer_report import onnx_op_types, report_from_log
    from stages.lib.trt.profiles import profile_for

    if not path.resolve().is_relative_to(ctx["work"].resolve()):
        raise RuntimeError(f"{path}: engines are built from the copies under {ctx['work']} only")
    sm = ctx["catalog"][TARGETS[mode]].sm
    profile = profile_for(graph, json.loads((ctx["fuse"] / f"{graph}.json").read_text()), ctx["profiles"])
    built = build_engine(ctx["backend"](sm), path, path.with_suffix(".engine"), sm, profile, ctx["opts"], None, graph)
    s = report_from_log(built.log, onnx_op_types(path))
    path.with_suffix(".layers.json").write_text(json.dumps(s.as_dict(), indent=1))
    return {"sm": sm, "layers": s.layers, "bytes": built.bytes, "low_precision_share": s.low_precision_share,
            "gemm_conv_precisions": s.gemm_conv_precisions, "fused_mha": s.fused_mha, "seconds": round(built.seconds, 2)}


def make_row(label: str, graph: str, mode: str, nodes: dict[str, Path], calib: Feeds,
             held: tuple[Feeds, Feeds, str], ctx: dict[str, Any]) -> dict[str, Any]:
    """Quantize, score on the held-out set, then build the engine. A step that fails becomes the
    row's one-line error; it never stops the bench."""
    row: dict[str, Any] = {"graph": graph, "mode": mode, "quantizer": label}
    try:
        with timed(f"quantize: {label.split(' (')[0]}"):
            t = time.perf_counter()
            path, info = quantized(label, graph, mode, nodes, calib, ctx["work"] / f"{graph}.{mode}" / ROWS[label])
            row |= {**info, "quantize_s": round(time.perf_counter() - t, 2)}
        row["weight_share_dq"] = weight_share_of(path)
        with timed("held-out runs"):
            row["parity"] = score(path, held, graph == "decoder", ctx["noise"])
    except Exception as e:  # noqa: BLE001 - a quantizer that fails is a result, not a crash
        return row | {"error": first_line(e) if isinstance(e, RuntimeError) else f"{type(e).__name__}: {first_line(e)}"}
    try:
        with timed("engines"):
            row["engine"] = engine(path, graph, mode, ctx)
    except Exception as e:  # noqa: BLE001
        row["engine_error"] = first_line(e)
    return row


def print_table(rows: list[dict[str, Any]]) -> None:
    cols = (("graph", 7), ("mode", 4), ("quantizer", 38), ("w.q", 5), ("cos(pt)", 8), ("err x", 6), ("top1 dec", 8),
            ("top1 all", 8), ("layers", 6), ("lowp", 5), ("bytes", 8), ("bytes x", 7), ("q s", 5), ("eng s", 5))
    specs = (".2f", ".5f", ".2f", ".3f", ".3f", "d", ".2f", "d", ".2f", ".1f", ".1f")
    print("  ".join(f"{c:<{w}}" if i < 3 else f"{c:>{w}}" for i, (c, w) in enumerate(cols)))
    for r in rows:
        head = f"{r['graph']:<7}  {r['mode']:<4}  {r['quantizer']:<38}"
        if "error" in r:
            print(f"{head}  error: {r['error']}")
            continue
        p, e = r["parity"], r.get("engine") or {}
        base = next((b for b in rows if b["quantizer"] == BASE and (b["graph"], b["mode"]) == (r["graph"], r["mode"])
                     and "parity" in b), None)
        err = (1 - p["cosine"]) / max(1e-9, 1 - base["parity"]["cosine"]) if base else None
        bx = e["bytes"] / base["engine"]["bytes"] if base and e and base.get("engine") else None
        vals = (r.get("weight_share", r["weight_share_dq"]), p["cosine"], err, p.get("top1"), p.get("top1_all_pooled"),
                e.get("layers"), e.get("low_precision_share"), e.get("bytes"), bx, r.get("quantize_s"), e.get("seconds"))
        cells = ("-" if v is None else format(v, sp) for v, sp in zip(vals, specs, strict=True))
        print(head + "".join(f"  {c:>{w}}" for c, (_, w) in zip(cells, cols[3:], strict=True)))
        for note in filter(None, (r.get("note"), r.get("engine_error") and f"engine: {r['engine_error']}")):
            print(f"{'':<54}^ {note}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, default=REPO / "configs" / "default.yaml")
    ap.add_argument("--graphs", nargs="+", default=["vision", "decoder"], choices=["vision", "decoder"])
    ap.add_argument("--modes", nargs="+", default=["int8", "fp8"], choices=["int8", "fp8"])
    ap.add_argument("--out", type=Path, default=REPO / "artifacts" / "bench" / "anchors.json")
    a = ap.parse_args()
    t0 = time.perf_counter()
    from pipeline.config_io import load_config
    from pipeline.targets import load_catalog
    from stages.lib.parity.metrics import export_noise
    from stages.lib.qdq import heldout
    from stages.lib.trt.backend import resolve_backend
    from stages.lib.trt.builder import BuildOptions

    with timed("inputs (plan, held-out set)"):
        nodes = cached_outputs(a.config, a.modes)
        cfg = load_config(a.config)
        ctx: dict[str, Any] = {
            "fuse": nodes["fuse"], "catalog": load_catalog(), "noise": export_noise(nodes["fuse"]),
            "profiles": cfg.profiles.model_dump(mode="json"), "work": REPO / "artifacts" / "bench" / "anchors",
            "backend": lambda sm: resolve_backend("tensorrt-rtx", sm),
            "opts": BuildOptions(workspace_mb=cfg.engine.workspace_mb, optimization_level=cfg.engine.optimization_level)}
        sets = {g: held_out(nodes, g, cfg.model.trust_remote_code) for g in a.graphs}
        calib = {g: [{k: v for k, v in f.items() if k != "input_ids"}  # rides along for vision; not an input
                     for f in heldout.load_feeds(nodes["calibrate"] / f"feeds_{g}.npz")] for g in a.graphs}
    shutil.rmtree(ctx["work"], ignore_errors=True)
    rows = []
    for graph in a.graphs:
        for mode in a.modes:
            for label in ROWS:
                rows.append(make_row(label, graph, mode, nodes, calib[graph], sets[graph], ctx))
                print(f"[{time.perf_counter() - t0:6.1f}s] {graph} {mode} {label}: "
                      f"{rows[-1].get('error') or 'ok'}", file=sys.stderr, flush=True)
    total = time.perf_counter() - t0
    decisive = next((r["parity"]["top1_decisive"] for r in rows if "top1_decisive" in r.get("parity", {})), "-")
    print(f"\nsamples: held-out {', '.join(f'{g} {len(sets[g][0])}' for g in a.graphs)}, calibration "
          f"{', '.join(f'{g} {len(calib[g])}' for g in a.graphs)}; top1 dec: {decisive} decoder positions decisive "
          f"(noise {ctx['noise']:.4g}); w.q: quantized GEMM/conv weight share (vlmforge default: quantize.json); "
          f"err x: (1-cos)/(1-cos of {BASE}); lowp: engine GEMM/conv layers in INT8/FP8; engines: INT8 SM 8.6, "
          "FP8 SM 8.9; bytes x: engine bytes / vlmforge (all quantized)'s\n")
    print_table(rows)
    print("\nwall time per stage: " + ", ".join(f"{k} {v:.1f}s" for k, v in SECONDS.items()) + f"; total {total:.1f}s")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"config": str(a.config), "noise": ctx["noise"], "rows": rows,
                                 "stage_seconds": SECONDS, "total_seconds": total}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
