"""Quantize: explicit Q/DQ graphs per target precision (int8, fp8, int4-weight; fp16 = copy).

Per graph: the placement rules of `stages.lib.qdq.rules`, calibrated ranges from `calibrate`,
`keep_high_precision` patterns and the sensitivity fallback (`accuracy_budget`, on by default:
the most harmful layer groups stay high precision until the graph meets its gate, cosine and
decisive next tokens); INT8 tries SmoothQuant and INT4 AWQ, each kept where it measures better. Parity is
measured on the `reference` stage's held-out set (never the calibration set) against both the
unquantized graph and PyTorch, in onnxruntime with optimizations disabled. `key_uses_target` is
False: targets resolving to the same precisions share one cache entry.

`quantize.json`: {graph: {"precision", "qdq_pairs", "weight_dq", "weights": {"weights_total",
"weights_quantized", "share"}, "kept_high_precision": [{"node"|"group", "why"}], "skipped": {rule:
count}, "sensitivity", "parity": {"vs_unquantized", "vs_reference"}, "checker", "opset", ...}}.

Streaming, for 7-8B decoders on a 24 GB machine: the fused graph is read as structure only
(``graphio.load_proto(in_file=True)``: weights stay in ``<graph>.onnx.data``) and every candidate
is a fresh ``ir.from_proto`` of it; each weight is read once, a chunk at a time, for its scales,
and its codes are computed again, chunk by chunk, as the candidate is written (``streamed_weights.Rows``).
Every run (references, candidates, the result) goes through the block runner
(``heldout.run_all`` → ``stages.lib.segments.runner``: segment by segment at the graph's recorded cuts,
whole for a graph without them) from a file. Candidates are written under the output folder
(never /tmp, which may be RAM); the one chosen is moved into place, not written twice.
"""

from __future__ import annotations

import json
import shutil
import time
from collections import Counter
from typing import TYPE_CHECKING, Any

from pipeline.stage import (
    GateCheck,
    GateFailed,
    Stage,
    StageContext,
    StageError,
    StageResult,
    missed_message,
)
from stages.lib.checkpoints.reads import ALL_ROLES, checkpoint_reads
from stages.lib.dtypes import UNQUANTIZED
from stages.lib.qdq.report import KEPT, kept_layers, kept_table
from stages.lib.sizing import node_resources

if TYPE_CHECKING:
    from pipeline.config import BuildConfig
    from pipeline.targets import TargetSpec

GRAPHS = ("vision", "decoder")
IO_SPECS = ("vision.json", "decoder.json")


def _params(cfg: BuildConfig, target: TargetSpec | None) -> dict[str, Any]:
    if target is None:
        raise StageError("quantize is a per-target stage and needs a target")
    from pipeline.config_checks import has_decoder

    # a vision-only model's key holds no decoder setting: targets with byte-identical vision graphs share it
    graphs = GRAPHS if has_decoder(cfg) else ("vision",)
    prec = {g: target.resolve_precision(getattr(cfg.precision, g))[0] for g in graphs}
    return {
        "precision": prec, "kv_cache": cfg.precision.kv_cache if "decoder" in graphs else None,
        "quantize": {g: getattr(cfg.quantize, g).model_dump(mode="json") for g in graphs},
        "gates": {p: cfg.gates[p].model_dump(mode="json") for p in set(prec.values()) if p in cfg.gates},
        "trust_remote_code": cfg.model.trust_remote_code,
    }


def _graph_outputs(names: list[str], graph: str) -> list[str]:
    """What candidates are scored on: the logits; the image features (first) and Qwen3-VL's
    deepstack maps, which the decoder reads too."""
    if graph == "decoder":
        return ["logits"] if "logits" in names else names[:1]
    first = [n for n in names if not n.startswith("present")][:1]
    return first + [n for n in names if n.startswith("deepstack") and n not in first]


def _quantize_graph(ctx: StageContext, graph: str, mode: str, gq: dict[str, Any], feeds: list[dict[str, Any]],
                    torch_samples: list[dict[str, Any]]) -> tuple[dict[str, Any], list[GateCheck]]:

    import onnx_ir as ir

    from stages.lib.parity.metrics import export_noise, gate_checks
    from stages.lib.qdq import graphio, heldout, objectives, sensitivity
    from stages.lib.qdq.recipe import Calib, Recipe, build, weight_share
    from stages.lib.qdq.rules import rules_for

    # every quantized precision has a gate: pipeline.config merges the YAML's over the defaults
    gate = ctx.params["gates"][mode]
    src = ctx.inputs["fuse"] / f"{graph}.onnx"
    source = graphio.load_proto(src, in_file=True)  # structure and types; the weights stay in the file
    outputs = _graph_outputs([o.name for o in source.graph.output], graph)
    refs = _run_all(graph, src, feeds, outputs)
    calib = Calib.load(ctx.inputs["calibrate"] / f"ranges_{graph}.json")
    # fp8-mha is an FP8 pattern: a graph resolved to int8 on another target keeps projections only.
    attention = "fp8-mha" if gq.get("attention") == "fp8-mha" and mode == "fp8" else "none"
    recipe = Recipe(mode, keep=tuple(gq["keep_high_precision"]), attention=attention,
                    int4_block=int(gq["int4_block"]))
    # Rank layers on calibration samples; the held-out set grades the result only.
    kept_feeds = heldout.load_feeds(ctx.inputs["calibrate"] / f"feeds_{graph}.npz")
    calibration = bool(kept_feeds)
    # input_ids ride along in the decoder's for the vision objective; not a graph input
    search = [{k: v for k, v in f.items() if k != "input_ids"} for f in kept_feeds] if calibration else feeds
    work = ctx.out / f".{graph}-candidates"  # as big as the graph each: beside the output, not in /tmp
    values = None
    if not calibration:
        search_refs = refs
    elif _cuts(src):  # block by block: keep what a segment hands on, for ranking groups at their block
        from stages.lib.qdq.block_scores import reference_pass

        search_refs, values = reference_pass(src, search, outputs)
    else:
        search_refs = _run_all(graph, src, search, outputs)
    budget = sensitivity.search_budget(gq.get("accuracy_budget"), gate)
    tokens = None if budget is None else objectives.for_graph(graph, gate, ctx.inputs["fuse"], ctx.inputs["calibrate"],
                                                              len(search) if calibration else 0, outputs[0], search_refs)
    spec = ctx.inputs["fuse"] / f"{graph}.json"
    pre = json.loads(spec.read_text()).get("preprocess") if graph == "vision" and spec.is_file() else None
    # a BYO graph's calibration images, each at its noise floor (the others have no declared preprocessing)
    floors = heldout.noise_floors(src, search, search_refs, outputs[0], pre) if budget is not None and calibration \
        and pre else None
    ev = sensitivity.Evaluator(search, search_refs, outputs, workdir=work, values=values, tokens=tokens, budget=budget,
                               floors=floors, norm_limit=gate.get("norm_ratio") if floors else None)
    rules = rules_for(mode)

    def candidate(recipe: Recipe, name: str) -> tuple[Any, Any, float, list[dict[str, Any]]]:
        """Built, written and run once: the chosen one is moved to the output, not written again."""
        b = build(source, recipe, calib)
        if not [s for s in b.placement.sites if s.kind == "weight"] and not b.placement.kept:
            ops = "/".join(rules.ops)
            raise StageError(f"{graph}.onnx cannot take {mode}: it has no {ops} with constant weights to quantize")
        if mode == "int4-weight" and b.stats["weight_dq"] == 0 and not b.placement.kept:
            raise StageError(f"{graph}.onnx cannot take int4-weight: no MatMul/Gemm weight fits an INT4 block")
        path = work / name / f"{graph}.onnx"
        path.parent.mkdir()
        graphio.save(b.model, path)
        outs = ev.run(path)
        return b, path, ev.score(outs), outs

    choice: dict[str, Any] = {}
    out = ctx.out / f"{graph}.onnx"
    # AWQ (INT4) and SmoothQuant (INT8) are proxy searches on calibration statistics: each is kept
    # only where the whole graph measures better with it (score, then cosine; a tie keeps AWQ only)
    method = {"int4-weight": "awq", "int8": "smooth"}.get(mode)
    method = None if method == "smooth" and not calib.chan_amax else method  # an older calibration
    try:
        work.mkdir(exist_ok=True)
        if method is not None:
            tried = {a: candidate(recipe.with_method(method, a), method if a else "plain") for a in (True, False)}
            key = {a: (t[2], ev.cosine(t[3])) for a, t in tried.items()}
            on = key[True] > key[False] or (key[True] == key[False] and method == "awq")
            recipe, first = recipe.with_method(method, on), tried[on]
            shutil.rmtree(tried[not on][1].parent)  # disk: each is the graph's size
            choice = {method: tried[True][2], "plain": tried[False][2], "chosen": method if on else "plain",
                      "inputs": "calibration" if calibration else "held-out"}
        else:
            first = candidate(recipe, "full")
        if budget is not None and first[2] < budget:  # it falls back, so this one is not the result:
            shutil.rmtree(first[1].parent)  # its disk goes before the walk writes its own candidates
        built, sens = sensitivity.run(source, recipe, calib, budget, ev, full=(first[0], first[2]), path=src,
                                      report=lambda msg: ctx.report(f"{graph} {mode}: {msg}"))
        outs = None
        if built is first[0]:  # no fallback: the written candidate is the result
            for f in first[1].parent.iterdir():
                shutil.move(f, ctx.out / f.name)
            outs = first[3] if not calibration else None
        else:
            shutil.rmtree(first[1].parent, ignore_errors=True)
            graphio.save(built.model, out)  # tensor by tensor: the codes are computed as they are written
    except ValueError as e:
        raise StageError(f"{graph}.onnx: cannot quantize to {mode}: {str(e).splitlines()[0]}") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    try:
        graphio.check(out)
    except Exception as e:  # noqa: BLE001 - a checker failure is a bug in our output: name it
        raise StageError(f"{graph}.onnx after {mode} Q/DQ fails onnx.checker: {str(e).splitlines()[0]}") from None
    if outs is None:
        outs = _run_all(graph, out, feeds, outputs)
    logits = graph == "decoder"
    noise = export_noise(ctx.inputs["fuse"])  # the decisive positions' threshold (parity.metrics)
    par: dict[str, Any] = {"vs_unquantized": heldout.parity(outs, refs, outputs[0], logits, noise)}
    trefs = heldout.torch_refs(graph, torch_samples, outputs[0])
    if trefs is not None:
        held_floors = [s.get("noise_floor") for s in torch_samples]  # BYO: each image at its noise floor
        par["vs_reference"] = heldout.parity(outs, trefs, outputs[0], logits, noise, held_floors, gate)
    model_opset = built.model.opset_imports.get("", 0)
    entry = {
        "precision": mode, "source": str(src.name), "output": outputs[0], "opset": model_opset,
        "qdq_pairs": int(built.stats.get("qdq_pairs", 0)), "weight_dq": int(built.stats.get("weight_dq", 0)),
        "weights": weight_share(ir.from_proto(source).graph, built.placement, built.stats),
        "kept_high_precision": kept_layers(built.placement, sens),
        "skipped": dict(Counter(s["rule"] for s in built.placement.skipped)),
        "skipped_nodes": built.placement.skipped[:200],
        "sensitivity": sens.as_dict(), "parity": par, "checker": True, "ort": "ORT_DISABLE_ALL",
        "runner": "segments" if _cuts(src) else "whole",
        "held_out": "reference", "sensitivity_inputs": "calibration" if calibration else "held-out",
        "search_objective": {"cosine": budget, "top1": tokens.target, "noise": tokens.noise, "compared": tokens.inputs}
        if tokens is not None else {"cosine": budget, **({"noise_floors": [[round(float(v), 6) for v in f]
                                                                            for f in floors]} if floors else {})},
        "int4_blocks": built.stats.get("blocks"), "int4_awq": choice if method == "awq" else None,
        "smoothquant": {**choice, "groups": (built.stats.get("smoothquant") or {}).get("groups")}
        if method == "smooth" else None,
        "awq_scales": built.stats.get("awq_scales"),
        "attention": "projections only" if attention == "none" else attention,
    }
    basis = par.get("vs_reference", par["vs_unquantized"])
    figures = {k: v for k, v in basis.items() if logits or k != "top1"}
    return entry, gate_checks(f"{graph}.{mode}", figures, gate)


def _run_all(graph: str, path: Any, feeds: list[dict[str, Any]], outputs: list[str]) -> list[dict[str, Any]]:
    from stages.lib.qdq import heldout

    try:
        return heldout.run_all(path, feeds, outputs)
    except ValueError as e:  # a stale cut list, an input nobody feeds
        raise StageError(f"{graph}.onnx cannot run segment by segment: {str(e).splitlines()[0]}") from None


def _cuts(path: Any) -> list[str]:
    import onnx

    from stages.lib.segments.plan import model_cuts

    return model_cuts(onnx.load(str(path), load_external_data=False))


def _run(ctx: StageContext) -> StageResult:
    from stages.lib.checkpoints.local import resolve_checkpoint
    from stages.lib.qdq import heldout
    from stages.lib.qdq.calibset import Feeder, ImageFeeder, Sample
    from stages.lib.reference_io import load_reference
    from stages.lib.segments.runner import graph_inputs

    t0 = time.time()
    p, fused = ctx.params, ctx.inputs["fuse"]
    graphs = GRAPHS if (fused / "decoder.onnx").is_file() else ("vision",)  # vision-only models
    _, samples = load_reference(ctx.inputs["reference"])
    if "decoder" in graphs:
        ckpt, family = resolve_checkpoint(ctx.inputs["checkpoint"])
        # the specs only: the held-out set already holds its embeddings (no embed.onnx session)
        feeder: Any = Feeder(ckpt, family, 8, None, trust_remote_code=bool(p["trust_remote_code"]))
    else:
        spec = fused / "vision.json"
        feeder = ImageFeeder(json.loads(spec.read_text()) if spec.is_file() else {})
    report: dict[str, Any] = {}
    gates: list[GateCheck] = []
    for name in ("embed.onnx", "embed.onnx.data", *IO_SPECS):  # embeddings are a Gather: nothing to quantize
        if (fused / name).is_file():
            shutil.copy2(fused / name, ctx.out / name)
    for graph in graphs:
        mode = p["precision"][graph]
        ctx.report(f"{graph}: {mode}", GRAPHS.index(graph) / len(GRAPHS))
        if mode in UNQUANTIZED:
            for name in (f"{graph}.onnx", f"{graph}.onnx.data"):  # the data file too, when it has one
                if (fused / name).is_file():
                    shutil.copy2(fused / name, ctx.out / name)
            report[graph] = {"precision": mode, "qdq_pairs": 0, "weight_dq": 0, "copied": True, "checker": None}
            continue
        if graph == "vision" and isinstance(feeder, ImageFeeder):
            if not all("image" in s for s in samples):
                raise StageError(f"{ctx.inputs['reference']}: the held-out set has no images to feed vision.onnx")
            feeds = [feeder.vision(Sample(f"held-out-{i}", s["image"], ""))[0] for i, s in enumerate(samples)]
        elif graph == "vision":
            feeds = heldout.vision_feeds(samples, feeder.vspec)
        else:
            feeds = heldout.decoder_feeds(samples, graph_inputs(fused / "decoder.onnx"), feeder.tspec)
        report[graph], checks = _quantize_graph(ctx, graph, mode, p["quantize"][graph], feeds, samples)
        gates += checks
    if "decoder" in graphs:  # the cache is the decoder's I/O: given its precision last, after any copy
        from stages.lib.qdq import kv_cache

        try:
            kv = kv_cache.apply(ctx.out / "decoder.onnx", ctx.inputs["calibrate"] / "ranges_decoder.json", p["kv_cache"])
        except (ValueError, OSError) as e:
            raise StageError(f"decoder.onnx: cannot give the KV cache {p['kv_cache']}: {str(e).splitlines()[0]}") from None
        report["decoder"]["kv_cache"] = kv.as_dict()
    # io specs travel with their graphs (fuse copies them from the exporters)
    notes = [f"{g}.json not in the fuse folder; not copied" for g in graphs if not (ctx.out / f"{g}.json").is_file()]
    (ctx.out / "quantize.json").write_text(json.dumps(report, indent=2))
    metrics: dict[str, Any] = {g: {k: report[g].get(k) for k in ("precision", "qdq_pairs", "weight_dq")} for g in graphs}
    for g in graphs:
        if "parity" in report[g]:
            metrics[g]["parity"] = {k: {m: v.get(m) for m in ("cosine", "top1") if m in v}
                                    for k, v in report[g]["parity"].items()}
            metrics[g]["weights_share"] = round(report[g]["weights"]["share"], 4)
            metrics[g]["kept"] = len(report[g]["kept_high_precision"])
    if "kv_cache" in report.get("decoder", {}):
        metrics["decoder"]["kv_cache"] = {k: v for k, v in report["decoder"]["kv_cache"].items() if k != "scales"}
    metrics["seconds"] = round(time.time() - t0, 2)
    result = StageResult(metrics=metrics, gates=gates, notes=notes, report=[kept_table(report, graphs)])
    missed = missed_message(gates, head="quantize gate missed", hint="keep layers high precision: "
                            "quantize.<graph>.keep_high_precision, or a higher quantize.<graph>.accuracy_budget")
    if missed:  # raised here, not left to the worker, for the hint: what to change
        raise GateFailed(missed, result)
    return result


STAGE = Stage(
    name="quantize",
    resources=node_resources("quantize"),
    # 4: budget "gate"; 5: ranked at blocks past a scoring cost (vision too), the walk predicts k;
    # 6: the report's kept-layers table comes from the result; 7: the search keeps the decisive
    # next-token agreement (qdq.objectives), top-1 at decisive positions, deepstack maps scored;
    # INT8 SmoothQuant (qdq.smoothquant) kept where the graph measures better with it; 8: the KV
    # cache in precision.kv_cache (qdq.kv_cache), its bytes per token in the report
    # 9: BYO vision: the search and the held-out gate grade each sample at its noise floor (+ norm ratio)
    version="9",
    run=_run,
    params=_params,
    external=checkpoint_reads(*ALL_ROLES),
    deps=("fuse", "calibrate", "checkpoint", "reference"),
    # decoder.onnx and embed.onnx too when the model has a decoder (CNN/BYO vision models have none)
    outputs=("vision.onnx", "quantize.json"),
    per_target=True,
    key_uses_target=False,
    toolchain=("onnx", "onnxruntime", "onnx-ir", "numpy", "ml-dtypes"),
    description="explicit Q/DQ graphs (int8/fp8/int4-weight) with calibrated scales and mixed precision",
    report_sections=((KEPT, "No graph was quantized in this run."),),
)
