"""Fusion effect on real TensorRT-RTX engines (built on CPU): layer counts, fused MHA kernels,
conv layers with fused activation, and the share of GEMM/conv layers in INT8/FP8, for

    fusion off | fusion on   ×   fp16 | int8 | fp8 (Q/DQ stage placement)   and
    onnxruntime.quantization.quantize_static (QDQ, symmetric, per-channel) on the unfused graph,

side by side in one run. Graphs: a ViT-style and a decoder-style attention stack shaped like the
exporter's output (tests/fusion_samples.py) and the generated ResNet (cnn_export.py).

    .venv/bin/python bench/fusion_effect.py [--sm 8.9] [--no-cnn] [--config configs/default.yaml] [--json out.json]

``--config`` adds the config's real exported vision and decoder graphs (no quantize_static
row for those: their FP32 twin would need a second export).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

Profile = dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]  # name: (min, opt, max)


def fuse(proto: Any, opset: int) -> Any:
    import onnx_ir as ir

    from stages.lib.fusion import apply_rules, resolve_attention_mode

    m = ir.from_proto(proto)
    apply_rules(m, attention=resolve_attention_mode("auto", opset), fold_batchnorm=True, cleanup=True)
    return ir.to_proto(m)


def calib_for(proto: Any, feeds: list[dict[str, Any]]) -> Any:
    """Max-abs ranges of every tensor the Q/DQ stage may quantize (its own collector)."""
    import onnx_ir as ir

    from stages.lib.qdq import calibrators as C
    from stages.lib.qdq import graphio
    from stages.lib.qdq.recipe import Calib

    col, sess = C.make_collector(ir.from_proto(proto))
    for f in feeds:
        col.update(graphio.run(sess, f, col.names))
    return Calib.from_ranges({"tensors": col.ranges("max"), "order": col.names})


def qdq(proto: Any, mode: str, feeds: list[dict[str, Any]], attention: str = "none") -> Any:
    from stages.lib.qdq.graphio import to_proto
    from stages.lib.qdq.recipe import Recipe, build

    return to_proto(build(proto, Recipe(mode=mode, attention=attention), calib_for(proto, feeds)).model)


def ort_quantize_static(proto32: Any, feeds: list[dict[str, Any]], work: Path,
                        op_types: tuple[str, ...] | None = None) -> Any:
    """The anchor: ORT's static QDQ quantizer, TensorRT-friendly options (symmetric activations,
    per-channel weights), on the FP32 graph without our fusion."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(feeds)

        def get_next(self) -> dict[str, Any] | None:
            return next(self.it, None)

    src, dst = work / "qs_in.onnx", work / "qs_out.onnx"
    onnx.save(proto32, src)
    kw: dict[str, Any] = {"op_types_to_quantize": list(op_types)} if op_types else {}
    quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=True, **kw,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                    extra_options={"ActivationSymmetric": True, "WeightSymmetric": True})
    return onnx.load(str(dst))


def engine_summary(proto: Any, sm: str, profile: Profile, work: Path, name: str) -> dict[str, Any]:
    import onnx

    from stages.lib.trt.backend import resolve_backend
    from stages.lib.trt.builder import BuildOptions, build_engine
    from stages.lib.trt.layer_report import onnx_op_types, report_from_log

    path = work / f"{name}.onnx"
    onnx.save(proto, path)
    r = build_engine(resolve_backend("tensorrt-rtx", sm), path, work / f"{name}.engine", sm, profile, BuildOptions())
    s = report_from_log(r.log, onnx_op_types(path))
    return {"layers": s.layers, "fused_mha": s.fused_mha, "mha_precisions": s.mha_precisions,
            "conv_layers": s.conv_layers, "conv_fused_activation": s.conv_fused_activation,
            "gemm_conv_layers": s.gemm_conv_layers, "low_precision_share": s.low_precision_share,
            "build_s": round(r.seconds, 2)}


Case = tuple[str, Any, Any, int, Profile, list[dict[str, Any]]]  # name, fused, unfused, nodes, profile, feeds


def graphs(with_cnn: bool, work: Path) -> list[Case]:
    """(name, fp16 graph, fp32 twin, opset, profile, calibration feeds) per benchmark graph."""
    import dataclasses

    import onnx

    from stages.lib.fusion.check import random_feeds
    from tests.fusion_samples import AttnSpec, attention_model

    out: list[Case] = []
    specs = {
        "vit_attn_x2": AttnSpec(scale="qk_sqrt_both", torchlib_kt=True, mask="window", layers=2, seq=64, heads=4,
                                head_dim=64, dtype="float16"),
        "decoder_kv_gqa_x2": AttnSpec(kv_cache=True, n_rep=2, mask="causal", softmax_fp32=True, layers=2, seq=32,
                                      past=32, heads=4, head_dim=64, dtype="float16"),
    }
    for name, spec in specs.items():
        m16, m32 = attention_model(spec), attention_model(dataclasses.replace(spec, dtype="float32"))
        feeds: list[dict[str, Any]] = [random_feeds(m16, seed=i) for i in range(4)]
        out.append((name, m16, m32, spec.opset, {}, feeds))
    if with_cnn:
        import numpy as np

        from stages.lib.export.cnn import export_cnn, generate_tiny_cnn

        ck = generate_tiny_cnn(work / "resnet_ckpt", seed=0)
        for dt in ("fp16", "fp32"):
            export_cnn(ck, work / f"resnet_{dt}", {"dtype": dt, "opset": 19})
        m16, m32 = (onnx.load(str(work / f"resnet_{dt}" / "vision.onnx")) for dt in ("fp16", "fp32"))
        rng = np.random.default_rng(0)
        feeds = [{"pixel_values": rng.standard_normal((1, 3, 224, 224)).astype(np.float16)}
                                       for _ in range(4)]
        prof: Profile = {"pixel_values": ((1, 3, 56, 56), (1, 3, 224, 224), (2, 3, 448, 448))}
        out.append(("resnet18_narrow", m16, m32, 19, prof, feeds))
    return out


def real_graphs(config: Path, work: Path) -> list[Case]:
    """The config's own checkpoint exported by the real stages (run in-process, no cache), each
    graph with its engine profile and random feeds shaped as the fuse stage shapes them."""
    import onnx

    from pipeline.config_io import load_config
    from pipeline.stage import GateFailed, StageContext, missed_message
    from stages.fuse import _axis_sizes
    from stages.lib.fusion.check import random_feeds
    from stages.lib.trt.profiles import profile_for

    cfg = load_config(config)
    folders: dict[str, Path] = {}
    for name in ("checkpoint", "export_vision", "export_decoder"):
        stage = __import__(f"stages.{name}", fromlist=["STAGE"]).STAGE
        folders[name] = work / name
        folders[name].mkdir(parents=True, exist_ok=True)  # the runner creates ctx.out; we stand in for it
        res = stage.run(StageContext(name, stage.params(cfg, None), {d: folders[d] for d in stage.deps},
                                     folders[name], None, stage.external(cfg) if stage.external else []))
        if (missed := missed_message(res.gates)) is not None:  # the worker's rule: a missed gate fails
            raise GateFailed(missed, res)
    out: list[Case] = []
    for g, folder in (("vision", folders["export_vision"]), ("decoder", folders["export_decoder"])):
        if not (folder / f"{g}.onnx").is_file():
            continue
        spec = json.loads((folder / f"{g}.json").read_text())
        m = onnx.load(str(folder / f"{g}.onnx"))
        feeds = [random_feeds(m, _axis_sizes(spec), seed=i) for i in range(4)]
        opset = next(o.version for o in m.opset_import if o.domain in ("", "ai.onnx"))
        out.append((f"{cfg.name}:{g}", m, None, opset, profile_for(g, spec, cfg.profiles.model_dump()), feeds))
    return out


def run(sm: str = "8.9", with_cnn: bool = True, config: Path | None = None) -> list[dict[str, Any]]:
    import numpy as np

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        todo = graphs(with_cnn, work) + (real_graphs(config, work / "real") if config else [])
        for name, m16, m32, opset, prof, feeds in todo:
            feeds32 = [{k: v.astype(np.float32) if v.dtype == np.float16 else v for k, v in f.items()} for f in feeds]
            fused = fuse(m16, opset)
            cases: list[tuple[str, str, Any]] = [("off", "fp16", m16), ("on", "fp16", fused)]
            for mode in ("int8", "fp8"):
                cases += [("off", mode, qdq(m16, mode, feeds)), ("on", mode, qdq(fused, mode, feeds))]
            cases += [("off", "fp8 (fp8-mha)", qdq(m16, "fp8", feeds, attention="fp8-mha")),
                      ("on", "fp8 (fp8-mha)", qdq(fused, "fp8", feeds, attention="fp8-mha"))]
            for ops in (None, ("Conv", "MatMul", "Gemm")) if m32 is not None else ():
                label = "int8 quantize_static" + (" (Conv/MatMul/Gemm only)" if ops else " (defaults)")
                cases += [("off", label, ort_quantize_static(m32, feeds32, work, ops))]
            for fusion, prec, proto in cases:
                tag = "".join(c if c.isalnum() else "_" for c in f"{name}_{fusion}_{prec}")
                try:
                    s = engine_summary(proto, sm, prof, work, tag)
                except Exception as e:  # noqa: BLE001 - a refused build is a result too
                    s = {"error": str(e).splitlines()[0][:200]}
                rows.append({"graph": name, "fusion": fusion, "precision": prec, "sm": sm,
                             "onnx_nodes": len(proto.graph.node), **s})
                print(json.dumps(rows[-1]), flush=True)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    head = "| graph | fusion | precision | ONNX nodes | engine layers | fused MHA | conv (fused act) | low-prec GEMM/conv share |"
    lines = [head, "|" + "---|" * 8]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['graph']} | {r['fusion']} | {r['precision']} | {r['onnx_nodes']} | build failed: "
                         f"{r['error']} | | | |")
            continue
        lines.append(f"| {r['graph']} | {r['fusion']} | {r['precision']} | {r['onnx_nodes']} | {r['layers']} | "
                     f"{r['fused_mha']} {r['mha_precisions'] or ''} | {r['conv_layers']} ({r['conv_fused_activation']}) | "
                     f"{r['low_precision_share']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sm", default="8.9")
    ap.add_argument("--no-cnn", action="store_true")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--config", type=Path, help="also export this config's model with the real stages")
    a = ap.parse_args()
    rows = run(a.sm, not a.no_cnn, a.config)
    print(table(rows))
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
