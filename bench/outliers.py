"""INT8 with and without SmoothQuant on the tiny Qwen2.5-VL decoder, given activation outliers.

    .venv/bin/python bench/outliers.py [--config configs/default.yaml] [--work DIR] [--factor-range 20 60]
                                       [--channels 4] [--cal-samples N]

Trained LLMs have a few input channels of the q/k/v and gate/up inputs 10-100x larger than the
rest; a random-weight tiny model has none. This builds the upstream stages (checkpoint, export,
fuse, reference; the real stage code, into --work), then injects them without changing the
float model: a few channels of each input_layernorm / post_attention_layernorm gamma are scaled
by 20-60x and the matching input rows of the q/k/v and gate/up weights divided by the same
factor. Both the original and the injected decoder are calibrated with the project's collector
on the calibration set (as the calibrate stage builds it), quantized INT8 with and without
``Recipe.smooth``, and scored in onnxruntime (optimizations off) on the reference stage's
held-out set against their own unquantized graph: worst-sample logits cosine and top-1 agreement
pooled over the distinct positions, plus what the per-group choice picked.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

NORMS = {"input_layernorm": ("q_proj", "k_proj", "v_proj"), "post_attention_layernorm": ("gate_proj", "up_proj")}


def inject(src: Path, dst: Path, channels: int, lo: float, hi: float, seed: int = 0) -> dict[str, Any]:
    """Copy the graph at ``src`` to ``dst`` with outlier channels moved from the weights into the
    norms (gamma_j * f_j, W_j / f_j: the same float function). Returns what was scaled."""
    import onnx
    from onnx import numpy_helper

    from stages.lib.qdq import graphio

    proto = graphio.load_proto(src)
    inits = {t.name: t for t in proto.graph.initializer}
    rng = np.random.default_rng(seed)
    done: dict[str, Any] = {}
    for node in proto.graph.node:
        norm = next((k for k in NORMS if f"/{k}/" in node.name), None)
        gamma = next((i for i in node.input if i in inits and len(inits[i].dims) == 1), None)
        if node.op_type != "Mul" or norm is None or gamma is None:
            continue
        readers = [n for n in proto.graph.node if node.output[0] in n.input]
        weights = [r.input[1] for r in readers if r.op_type == "MatMul" and r.input[0] == node.output[0]]
        if len(weights) != len(NORMS[norm]) or any(w not in inits for w in weights):
            continue
        g = numpy_helper.to_array(inits[gamma])
        idx = rng.choice(g.shape[0], channels, replace=False)
        f = np.ones(g.shape[0], np.float64)
        f[idx] = rng.uniform(lo, hi, channels)
        # a gamma shared by several norms (exporters deduplicate equal initializers): own copy
        new_g = f"{gamma}_outliers_{len(done)}"
        proto.graph.initializer.append(numpy_helper.from_array((g * f).astype(g.dtype), new_g))
        node.input[list(node.input).index(gamma)] = new_g
        for w_name in weights:  # [K, N] MatMul weights: row j is input channel j
            w = numpy_helper.to_array(inits[w_name])
            inits[w_name].CopyFrom(numpy_helper.from_array((w / f[:, None]).astype(w.dtype), w_name))
        done[node.output[0]] = {"norm": node.name, "channels": sorted(int(i) for i in idx),
                                "factors": [round(float(f[i]), 1) for i in sorted(idx)]}
    onnx.save(proto, str(dst))
    return done


def calibrate(model_path: Path, feeds: list[dict[str, np.ndarray]]) -> Any:
    from stages.lib.qdq import calibrators as C
    from stages.lib.qdq import graphio
    from stages.lib.qdq.recipe import Calib

    col, sess = C.make_collector(graphio.load(model_path))
    for f in feeds:
        col.update(graphio.run(sess, f, col.names))
    return Calib.from_ranges({"tensors": col.ranges("max"), "order": col.names}, col.arrays())


def quantize_and_score(src: Path, calib: Any, smooth: bool, feeds: list[dict[str, np.ndarray]],
                       fp_outs: list[dict[str, np.ndarray]], dst: Path) -> dict[str, Any]:
    import onnx

    from stages.lib.parity.metrics import compare, topk_agreement
    from stages.lib.qdq import graphio, heldout
    from stages.lib.qdq.recipe import Recipe, build

    t = time.time()
    built = build(onnx.shape_inference.infer_shapes(onnx.load(str(src))), Recipe("int8", smooth=smooth), calib)
    build_s = time.time() - t
    graphio.save(built.model, dst)
    outs = heldout.run_all(dst, feeds, ["logits"])
    pairs = [(np.asarray(o["logits"], np.float32), np.asarray(r["logits"], np.float32)) for o, r in zip(outs, fp_outs, strict=True)]
    # top-1 pooled over distinct positions: every held-out prompt starts with the same 7 tokens
    # (identical rows, one small-margin position counted 56 times otherwise)
    out_rows = np.concatenate([a.reshape(-1, a.shape[-1]) for a, _ in pairs])
    ref_rows = np.concatenate([b.reshape(-1, b.shape[-1]) for _, b in pairs])
    _, first = np.unique(ref_rows.round(4), axis=0, return_index=True)
    cos = [compare(a, b).cosine for a, b in pairs]
    return {"cosine": min(cos), "mean_err": float(np.mean([1 - c for c in cos])),
            "top1": topk_agreement(out_rows[first], ref_rows[first]), "positions": int(first.size),
            "qdq_pairs": built.stats["qdq_pairs"], "build_s": build_s, "smooth": built.stats.get("smoothquant")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(REPO / "configs" / "default.yaml"))
    ap.add_argument("--work", default=str(REPO / "artifacts" / "bench" / "outliers"))
    ap.add_argument("--channels", type=int, default=4, help="outlier channels per norm")
    ap.add_argument("--factor-range", type=float, nargs=2, default=(20.0, 60.0))
    ap.add_argument("--cal-samples", type=int, default=None, help="calibration samples (default: the config's)")
    ap.add_argument("--heldout", type=int, default=8, help="held-out samples (the reference stage's verify.samples)")
    a = ap.parse_args()
    import importlib.util

    from pipeline.config_io import load_config
    # the sibling bench's stage runner and feeds, loaded by path: bench/ is scripts, not a package
    spec = importlib.util.spec_from_file_location("quant_vs_ort", REPO / "bench" / "quant_vs_ort.py")
    assert spec is not None and spec.loader is not None
    sibling = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sibling)
    calibration_feeds, held_out, run_stage = sibling.calibration_feeds, sibling.held_out, sibling.run_stage
    from stages.lib.qdq import heldout

    cfg = load_config(a.config)
    cfg = cfg.model_copy(update={"export": cfg.export.model_copy(update={"dtype": "fp32"})})
    cfg = cfg.model_copy(update={"verify": cfg.verify.model_copy(update={"samples": a.heldout})})
    if a.cal_samples is not None:
        cfg = cfg.model_copy(update={"calibration": cfg.calibration.model_copy(update={"samples": a.cal_samples})})
    work = Path(a.work) / f"heldout{a.heldout}"  # the reference stage depends on it
    work.mkdir(parents=True, exist_ok=True)
    for name in ("checkpoint", "export_vision", "export_decoder", "fuse", "reference"):
        t = time.time()
        run_stage(name, cfg, work)
        print(f"{name}: {time.time() - t:.1f}s", file=sys.stderr)
    cal = calibration_feeds(cfg, work)["decoder"]
    feeds, _, _ = held_out(work, "decoder")
    src = work / "fuse" / "decoder.onnx"
    injected = inject(src, work / "decoder.outliers.onnx", a.channels, *a.factor_range)
    rows = sum(int(f["inputs_embeds"].shape[1]) for f in cal)
    print(f"calibration: {len(cal)} samples, {rows} decoder rows; held-out: {len(feeds)} samples; "
          f"outliers injected into {len(injected)} norms ({a.channels} channels each, x{a.factor_range[0]:g}-{a.factor_range[1]:g})")
    fp = {"original": heldout.run_all(src, feeds, ["logits"]),
          "outliers": heldout.run_all(work / "decoder.outliers.onnx", feeds, ["logits"])}
    same = min(float(np.dot(x["logits"].ravel(), y["logits"].ravel()) / np.linalg.norm(x["logits"]) / np.linalg.norm(y["logits"]))
               for x, y in zip(fp["original"], fp["outliers"], strict=True))
    print(f"float model unchanged by the injection: logits cosine {same:.8f}")
    results: dict[str, dict[bool, dict[str, Any]]] = {}
    for label, path in (("original", src), ("outliers", work / "decoder.outliers.onnx")):
        calib = calibrate(path, cal)
        results[label] = {sm: quantize_and_score(path, calib, sm, feeds, fp[label], work / f"decoder.{label}.{'smooth' if sm else 'plain'}.onnx")
                          for sm in (False, True)}
    n_pos = results["original"][False]["positions"]
    print(f"\n{'decoder':9} {'int8':7} {'worst cos':>10} {'mean 1-cos':>11} {'top1':>6} {'groups smoothed':>16} {'build s':>8}"
          f"   (cosine of the logits vs the unquantized graph; top1 over {n_pos} distinct positions)")
    for label, row in results.items():
        for sm, r in row.items():
            groups = (r["smooth"] or {}).get("groups", {})
            picked = f"{sum(g['stat'] is not None for g in groups.values())}/{len(groups)}" if sm else "-"
            print(f"{label:9} {'smooth' if sm else 'plain':7} {r['cosine']:10.6f} {r['mean_err']:11.2e} {r['top1']:6.3f} "
                  f"{picked:>16} {r['build_s']:8.2f}")
        plain, smooth = row[False], row[True]
        worst = (1 - plain["cosine"]) / max(1 - smooth["cosine"], 1e-12)
        print(f"{label:9} plain / smooth: worst-sample (1-cos) {worst:.2f}x, mean (1-cos) "
              f"{plain['mean_err'] / max(smooth['mean_err'], 1e-12):.2f}x; top1 {plain['top1']:.3f} -> {smooth['top1']:.3f}")
    # gamma * f and W / f scale amax_j and rms_j by f and max|W_j| by 1 / f: s_j scales by f, so a
    # smoothed group is the same whether the outliers were injected or not
    print("\nper-group choice (estimated relative output error: none -> chosen):")
    for label, row in results.items():
        for x, g in ((row[True]["smooth"] or {}).get("groups", {})).items():
            inj = "injected" if x in injected and label == "outliers" else "-"
            print(f"  {label:9} {x:12} {inj:9} {g['choice']:8} {g['err_before']:.3e} -> {g['err_after']:.3e} "
                  f"amax {g['amax'][0]:.3g} -> {g['amax'][1]:.3g}  ({', '.join(c.split('/')[-2] for c in g['consumers'])})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
