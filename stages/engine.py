"""engine@T: build the quantized graphs into TensorRT engines for one GPU target.

Input (quantize@T): `vision.onnx`, `decoder.onnx` (optionally `embed.onnx`), `quantize.json`
{graph: {"precision": ...}} and the io specs `vision.json` / `decoder.json` (`embed.json`).
Output: `<graph>.engine`, `<graph>.engine.json` (sidecar), `<graph>.layers.json` (layer report).

Every graph's precision is checked against the target before the first build, so an FP8 graph
for an SM without FP8 fails fast. The timing cache is shared outside the cache (see
`stages/lib/trt/timing_cache.py`): it speeds builds up without changing what they produce.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.stage import ReportTable, Stage, StageContext, StageError, StageResult
from stages.lib.sizing import node_resources

if TYPE_CHECKING:
    from pipeline.config import BuildConfig
    from pipeline.targets import TargetSpec

GRAPHS = ("vision", "decoder", "embed")
REQUIRED = ("vision",)  # vision-only models (CNN, bring-your-own ONNX) have no decoder


def params(cfg: BuildConfig, target: TargetSpec | None) -> dict[str, Any]:
    assert target is not None
    return {
        "engine": cfg.engine.model_dump(mode="json"),
        "profiles": cfg.profiles.model_dump(mode="json"),
        "gates": {k: g.model_dump(mode="json") for k, g in cfg.gates.items()},  # engine parity, where it runs
        "builder": target.builder,
        "sm": target.sm,
    }


def needs_host(cfg: BuildConfig, target: TargetSpec | None) -> str | None:
    if target is None or target.builder != "tensorrt":
        return None  # TensorRT-RTX compiles ahead of time on any host
    from stages.lib.trt.backend import host_problem

    return host_problem(target.builder, target.sm)


def _io_spec(folder: Path, graph: str) -> dict[str, Any]:
    """The graph's io spec; for a graph without one, its axis names read from the ONNX inputs."""
    p = folder / f"{graph}.json"
    spec: dict[str, Any] = json.loads(p.read_text()) if p.is_file() else {}
    if graph == "embed" and not spec and (folder / "decoder.json").is_file():
        spec = json.loads((folder / "decoder.json").read_text()).get("embed") or {}  # export_decoder nests it
    if not spec.get("inputs"):
        import onnx

        m = onnx.load(str(folder / f"{graph}.onnx"), load_external_data=False)
        inits = {i.name for i in m.graph.initializer}
        spec["inputs"] = [{"name": i.name, "shape": [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]}
                          for i in m.graph.input if i.name not in inits]
    return spec


def _plan(src: Path, target: dict[str, Any]) -> list[tuple[str, str, set[str]]]:
    """(graph, precision, Q/DQ dtypes) for every graph, refused before any build if unsupported."""
    from stages.lib.trt.builder import graph_quant_dtypes, refuse_unsupported

    qpath = src / "quantize.json"
    if not qpath.is_file():
        raise StageError(f"{src}: quantize.json is missing (expected {{graph: {{precision: ...}}}})")
    qinfo = json.loads(qpath.read_text())
    named = dict.fromkeys((*REQUIRED, *(g for g in GRAPHS if g in qinfo)))  # what quantize says it wrote
    missing = [g for g in named if not (src / f"{g}.onnx").is_file()]
    if missing:
        raise StageError(f"{src}: missing {', '.join(g + '.onnx' for g in missing)}")
    plan = []
    for g in (g for g in GRAPHS if (src / f"{g}.onnx").is_file()):
        precision = str((qinfo.get(g) or {}).get("precision", "fp16"))
        quant = graph_quant_dtypes(src / f"{g}.onnx")
        refuse_unsupported(g, precision, quant, target)
        plan.append((g, precision, quant))
    return plan


def run(ctx: StageContext) -> StageResult:
    from stages.lib.parity import engine as engine_parity
    from stages.lib.parity.metrics import gate_checks
    from stages.lib.trt import timing_cache as trt_timing_cache
    from stages.lib.trt.backend import resolve_backend
    from stages.lib.trt.builder import BuildOptions, build_engine
    from stages.lib.trt.layer_report import attention_blocks, onnx_op_types, report_from_log
    from stages.lib.trt.profiles import profile_for

    assert ctx.target is not None, "engine is a per-target stage"
    target, p = ctx.target, ctx.params
    src = ctx.inputs["quantize"]
    plan = _plan(src, target)  # precision refusals first: no build has started yet
    backend = resolve_backend(target["builder"], target["sm"])
    e = p["engine"]
    opts = BuildOptions(
        workspace_mb=e["workspace_mb"], optimization_level=e["optimization_level"],
        hardware_compatible=e["hardware_compatible"], version_compatible=e["version_compatible"],
        weight_stripped=e["weight_stripped"], target_name=target["name"],
        timing_cache_dir=trt_timing_cache.default_dir() if e["timing_cache"] else None,
    )
    result = StageResult()
    rows: list[tuple[Any, ...]] = []  # the report's engine table
    for i, (g, precision, quant) in enumerate(plan):
        ctx.report(f"{g}: profile", i / len(plan))
        spec = _io_spec(src, g)
        profile = profile_for(g, spec, p["profiles"])
        built = build_engine(backend, src / f"{g}.onnx", ctx.out / f"{g}.engine", target["sm"], profile, opts,
                             ctx.report, g)
        summary = report_from_log(built.log, onnx_op_types(src / f"{g}.onnx"))
        blocks = attention_blocks(src / f"{g}.onnx")
        if summary.layers == 0:
            raise StageError(f"{g}: the build log has no layer list (needs DETAILED profiling verbosity)")
        (ctx.out / f"{g}.layers.json").write_text(json.dumps(summary.as_dict(), indent=1))
        heldout = engine_parity.heldout_path(src, g)
        why = engine_parity.why_not(backend, target["sm"], heldout)
        parity: dict[str, Any] = {"status": f"not run: {why}"} if why else {
            "status": "run", **engine_parity.run_parity(backend, ctx.out / f"{g}.engine", heldout)}
        if why:
            result.notes.append(f"{g} engine parity not run: {why}")
        else:
            # the gate of the graph's precision (an fp32/bf16 copy has none: fp16's), its cosine only
            gate = p["gates"].get(precision) or p["gates"]["fp16"]
            result.gates += gate_checks(f"engine.{g}", parity["worst"], {"cosine": gate["cosine"]})
        sidecar = {
            "graph": g, "target": target["name"], "gpu": target.get("gpu", ""), "sm": target["sm"],
            "builder": backend.name, "builder_module": backend.module, "builder_version": backend.version,
            "precision": precision, "precisions": {pg: pp for pg, pp, _ in plan}, "qdq_dtypes": sorted(quant),
            "profile": {k: {"min": list(v[0]), "opt": list(v[1]), "max": list(v[2])} for k, v in profile.items()},
            "inputs": built.inputs, "outputs": built.outputs,
            "sha256": built.sha256, "bytes": built.bytes, "build_seconds": round(built.seconds, 3),
            "peak_rss_mb": round(built.peak_rss_mb, 1), "builder_anon_mb": round(built.builder_anon_mb, 1),
            "options": {"workspace_mb": opts.workspace_mb, "optimization_level": opts.optimization_level,
                        "applied": built.options_applied, "unavailable": built.options_unavailable},
            "timing_cache": built.timing_cache, "parity": parity,
            "attention_blocks": blocks,
            "layers": {k: getattr(summary, k) for k in ("layers", "compute_layers", "fused_mha", "low_precision_share",
                                                          "conv_layers", "conv_fused_activation",
                                                          "softmax_nodes", "softmax_in_mha")},
        }
        kv = _kv_cache(built.inputs, profile)
        if kv:
            sidecar["kv_cache"] = kv
            result.metrics[f"{g}_kv_cache"] = kv
        (ctx.out / f"{g}.engine.json").write_text(json.dumps(sidecar, indent=1))
        result.notes += [f"{g}: {o} not applied" for o in built.options_unavailable]
        result.metrics[g] = {
            "precision": precision, "bytes": built.bytes, "layers": summary.layers,
            "compute_layers": summary.compute_layers, "fused_mha": summary.fused_mha, "attention_blocks": blocks,
            "low_precision_gemm_share": summary.low_precision_share, "build_seconds": round(built.seconds, 3),
            "conv_fused_activation": summary.conv_fused_activation, "conv_layers": summary.conv_layers,
            "softmax_in_mha": f"{summary.softmax_in_mha}/{summary.softmax_nodes}",
            "peak_rss_mb": round(built.peak_rss_mb, 1),
            "builder_anon_mb": round(built.builder_anon_mb, 1), "anon_before_build_mb": round(built.anon_before_mb, 1),
            "parity": parity["status"],
        }
        rows.append((target["name"], g, precision, summary.layers, summary.fused_mha, summary.low_precision_share,
                     _counts(summary.gemm_conv_precisions), _counts(summary.mha_precisions), built.bytes,
                     round(built.seconds, 3), parity["status"]))
    result.report.append(ReportTable(SECTION, COLUMNS, tuple(rows)))
    return result


def _kv_cache(inputs: list[dict[str, Any]], profile: dict[str, Any]) -> dict[str, Any] | None:
    """The KV cache an engine keeps at its profile's largest call: batch x (past + seq) tokens of
    every layer's K and V in the engine's I/O type, and what FP16 would take."""
    pasts = [t for t in inputs if t["name"].startswith("past_key_values.") and t["name"] in profile]
    if not pasts or "inputs_embeds" not in profile:
        return None
    seq = int(profile["inputs_embeds"][2][1])
    elems = sum(b * h * (past + seq) * d for b, h, past, d in (profile[t["name"]][2] for t in pasts))
    item = {"fp8": 1, "int8": 1, "half": 2, "float": 4}.get(str(pasts[0]["dtype"]), 2)
    return {"dtype": str(pasts[0]["dtype"]), "at_profile_max_mib": round(elems * item / 2**20, 3),
            "fp16_at_profile_max_mib": round(elems * 2 / 2**20, 3)}


def _counts(by_precision: dict[str, int]) -> str:
    return ", ".join(f"{k}: {v}" for k, v in sorted(by_precision.items()))


SECTION = "Engine precision summary"
COLUMNS = ("target", "graph", "precision", "layers", "fused MHA", "low-precision GEMM share",
           "GEMM/conv layer precisions", "fused MHA precisions", "bytes", "build s", "engine parity")


STAGE = Stage(
    name="engine",
    resources=node_resources("engine", gpu=True),
    # 2: BYO image inputs profiled by position (batch 1..max_images, H/W = resize); 3: the report's
    # engine table comes from the result; 4: the KV cache the decoder engine keeps at its profile's max
    # 5: compute_layers (less sync/shape layers), attention_blocks; Myelin conv fusions count as convs
    version="5",
    run=run,
    params=params,
    deps=("quantize",),
    # decoder/embed engines are written when the model has them (not for vision-only models)
    outputs=("vision.engine", "vision.engine.json", "vision.layers.json"),
    per_target=True,
    toolchain=("tensorrt-rtx-cu13-bindings", "tensorrt-rtx-cu13-libs", "tensorrt", "onnx"),
    description="TensorRT / TensorRT-RTX engines per target, with layer reports and sidecars",
    needs_host=needs_host,
    report_sections=((SECTION, "No engine was built in this run."),),
)
