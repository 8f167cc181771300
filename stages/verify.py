"""verify@T: does what we ship compute what the PyTorch model computes, and if not, where not?

Per graph x precision x target, on the held-out set of the ``reference`` stage:
- the quantized ONNX graphs in onnxruntime (CPU, optimizations off, block by block through
  stages/lib/segments/runner.py, so a 7-8B decoder fits a 24 GB machine): vision features, decoder
  prefill logits (cosine, rel-L2, max-abs, norm ratio; top-1/top-5 next-token agreement) and,
  in the same pass, the teacher-forced agreement over the reference's N greedy tokens;
- the generation row: ``tokens``, the teacher-forced agreement at the *decisive* generated
  positions (``parity.metrics.decisive``: the reference's lead above twice the unquantized
  export's logit error and at least 1 % of probability), gated; the free-running greedy generation through the graphs under test
  beside it (``tokens_free``), in whole-graph sessions, for graphs under ``FREE_RUN_LIMIT`` only;
- the vision_effect row: the reference decoder (PyTorch) fed the quantized vision graph's image
  features (``parity.vision_effect``): decisive ``top1`` / ``tokens`` and the mean ``kl``, gated by
  the vision precision's gate; a feature cosine above 0.99 does not pass a graph that changes
  what the decoder says;
- the engines, only where they can execute (a GPU of the target's SM plus the runtime); else
  the row says "engine comparison not run: <why>" with status "not-run", never "pass".
Gates come from ``gates[<precision>]`` (the precision each graph was quantized to is read from
``quantize.json``). A miss raises GateFailed with one line naming what missed and, after the
drill-down (``stages/lib/parity/drilldown.py``; the PyTorch side: ``stages/lib/parity/drilldown_torch.py``),
the first block where the error jumps.

``verify.json``: {"target", "sm", "reference": {...}, "rows": [{"graph", "precision", "target",
"runtime", "status": "pass|fail|not-run|ungated", "reason", "figures", "per_sample", "gates": [...]}
(generation also "gated_on": "free-running|teacher-forced", "embed")],
"drilldown": {graph: {"kind", "blocks": [...], "jump": {"block", "why", ...}, "plot"}},
"passed": bool, "not_run": [reasons]}.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

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
from stages.lib.parity.report import DRILLDOWN, PARITY, report_parts
from stages.lib.sizing import node_resources

if TYPE_CHECKING:
    from pipeline.config import BuildConfig
    from pipeline.targets import TargetSpec

GRAPHS = ("vision", "decoder")


def _params(cfg: BuildConfig, target: TargetSpec | None) -> dict[str, Any]:
    assert target is not None
    return {
        "gates": {k: g.model_dump(mode="json") for k, g in sorted(cfg.gates.items())},
        "drilldown": cfg.verify.drilldown,
        "generate_tokens": cfg.verify.generate_tokens,
        "target": target.name, "sm": target.sm, "builder": target.builder,
        "trust_remote_code": cfg.model.trust_remote_code,
    }


def _row(graph: str, precision: str, target: str, runtime: str, status: str, **kw: Any) -> dict[str, Any]:
    return {"graph": graph, "precision": precision, "target": target, "runtime": runtime, "status": status,
            "reason": kw.pop("reason", None), **kw}


def _gated_row(graph: str, precision: str, p: dict[str, Any], runtime: str, figures: dict[str, Any],
               per_sample: list[Any], gate: dict[str, Any]) -> tuple[dict[str, Any], list[GateCheck]]:
    from stages.lib.parity.metrics import gate_checks, gate_status

    checks = gate_checks(f"{graph}.{precision}.{runtime}", figures, gate)
    row = _row(graph, precision, p["target"], runtime, gate_status(checks), figures=figures, per_sample=per_sample,
               gates=[c.__dict__ for c in checks])
    return row, checks


def _engine_row(ctx: StageContext, graph: str, precision: str, feeds: dict[str, np.ndarray],
                ref: dict[str, np.ndarray], gate: dict[str, Any]) -> tuple[dict[str, Any], list[GateCheck]]:
    """Deserialize + run the engine on the very feeds the ONNX graph got, where that is possible."""
    p = ctx.params
    engine = ctx.inputs["engine"] / f"{graph}.engine"

    def not_run(why: str) -> tuple[dict[str, Any], list[GateCheck]]:
        return _row(graph, precision, p["target"], "tensorrt", "not-run",
                    reason=f"engine comparison not run: {why}"), []

    if not engine.is_file():
        return not_run(f"no {engine.name} in the engine stage's output")
    try:
        from stages.lib.parity import engine as engine_parity
        from stages.lib.trt.backend import resolve_backend

        backend = resolve_backend(p["builder"], p["sm"])
    except (ImportError, StageError) as e:
        return not_run(str(e))
    work = ctx.out / ".engine_io"
    work.mkdir(exist_ok=True)
    heldout = engine_parity.heldout_path(work, graph)
    savez: Any = np.savez  # numpy's stubs type **kwargs as its allow_pickle flag
    savez(heldout, **{f"in.{k}": v for k, v in feeds.items()}, **{f"ref.{k}": v for k, v in ref.items()})
    try:
        why = engine_parity.why_not(backend, p["sm"], heldout)
        if why:
            return not_run(why)
        res = engine_parity.run_parity(backend, engine, heldout)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return _gated_row(graph, precision, p, "tensorrt", res["worst"], [res["outputs"]], gate)


def _generation_row(ctx: StageContext, qdir: Path, graphs: list[str], label: str, specs: Any,
                    samples: list[dict[str, np.ndarray]], embed: Path, forced: Any,
                    gate: dict[str, Any]) -> tuple[dict[str, Any], list[GateCheck]]:
    """The token gate reads the teacher-forced agreement at the decisive generated positions
    (``tokens``: every graph under test, the reference's tokens fed back, at any size); the
    free-running greedy generation (``tokens_free``, ``tokens_prefix``: where the first divergence
    falls) is measured alongside where whole-graph sessions fit. After a free-running divergence
    the two sides continue different texts, so its later positions grade nothing."""
    from stages.lib.parity import graphs as vg

    p, vis = ctx.params, qdir / "vision.onnx" if "vision" in graphs else None
    size = sum(vg.fp16_weight_bytes(g) for g in (qdir / "decoder.onnx", embed, vis) if g is not None)
    figures: dict[str, Any] = {}
    per: list[dict[str, Any]] = [{} for _ in samples]
    reason = None
    if size < vg.FREE_RUN_LIMIT:
        ctx.report("free-running greedy generation through the graphs under test", 0.7)
        free = vg.measure_generation(vis, qdir / "decoder.onnx", embed, specs, samples, int(p["generate_tokens"]))
        figures = {"tokens_free": free.figures["tokens"], "tokens_prefix": free.figures["tokens_prefix"]}
        per = list(free.per_sample)
    else:
        reason = (f"free-running generation not run in onnxruntime: {'+'.join(graphs)}+embed hold "
                  f"{size / 2**30:.2f} GB of FP16 weights (limit {vg.FREE_RUN_LIMIT / 2**30:.2f} GB for "
                  "whole-graph CPU sessions); the engines generate on a GPU host (`vlmforge check` on the device)")
    if forced is None:
        return _row("generation", label, p["target"], "onnxruntime", "not-run" if not figures else "ungated",
                    figures=figures, per_sample=per, reason=reason or "no generated tokens in the reference"), []
    figures |= forced.figures
    per = [{**a, "teacher_forced": b} for a, b in zip(per, forced.per_sample, strict=True)]
    if "tokens" not in figures:
        reason = "; ".join(filter(None, [reason, f"no decisive generated position ({figures['tokens_decisive']}: "
                                                 "no reference lead clears the export's noise and 1 % of probability): not gated"]))
    row, checks = _gated_row("generation", label, p, "onnxruntime", figures, per, gate)
    through = f", read through the {label.split('kv:')[1]} KV cache" if "kv:" in label else ""
    row |= {"reason": reason, "gated_on": f"teacher-forced, decisive positions{through}"}
    return row, checks


def _run(ctx: StageContext) -> StageResult:
    from stages.lib.parity import feeds as vf
    from stages.lib.parity import graphs as vg
    from stages.lib.parity.metrics import export_noise
    from stages.lib.reference_io import load_reference

    p = ctx.params
    qdir = ctx.inputs["quantize"]
    quant = json.loads((qdir / "quantize.json").read_text())
    meta, samples = load_reference(ctx.inputs["reference"])
    specs = vf.load_specs(ctx.inputs["checkpoint"], trust_remote_code=bool(p["trust_remote_code"]))
    graphs = [g for g in GRAPHS if (qdir / f"{g}.onnx").is_file()]
    if not graphs:
        raise StageError(f"{qdir}: no vision.onnx or decoder.onnx to verify")
    rows: list[dict[str, Any]] = []
    checks: list[GateCheck] = []
    prec = {g: str((quant.get(g) or {}).get("precision", "fp16")) for g in graphs}

    def gate(g: str) -> dict[str, Any]:
        if prec[g] not in p["gates"]:
            raise StageError(f"quantize.json says {g} is {prec[g]!r}, which has no gate (gates: {', '.join(p['gates'])})")
        return dict(p["gates"][prec[g]])

    frac = 1 / (len(graphs) + 2)
    embed, embed_src = vg.embed_graph(qdir, specs, ctx.out / ".embed") if "decoder" in graphs else (None, None)
    forced = vision_out = None
    noise = export_noise(qdir)
    for i, g in enumerate(graphs):
        ctx.report(f"{g} ({prec[g]}) in onnxruntime", i * frac)

        def report(msg: str, i: int = i) -> None:
            ctx.report(msg, i * frac)

        if g == "vision":
            measured = vg.measure_vision(qdir / f"{g}.onnx", specs, samples, report, gate=gate(g),
                                         names=[str(m.get("image")) for m in meta["samples"]])
            vision_out = measured.outputs
        else:  # prefill parity and the teacher-forced agreement: one pass
            measured, forced = vg.measure_decoder(qdir / f"{g}.onnx", specs, samples, embed,
                                                  int(p["generate_tokens"]), report=report, noise=noise)
        row, cs = _gated_row(g, prec[g], p, "onnxruntime", measured.figures, measured.per_sample, gate(g))
        rows.append(row)
        checks += cs
    if embed is not None:
        kv = str(((quant.get("decoder") or {}).get("kv_cache") or {}).get("precision", "fp16"))
        label = "+".join([f"{g}:{prec[g]}" for g in graphs] + ([f"kv:{kv}"] if kv not in ("fp16", "fp32") else []))
        gate_d = {k: v for k, v in gate("decoder").items() if k == "tokens"}
        row, cs = _generation_row(ctx, qdir, graphs, label, specs, samples, embed, forced, gate_d)
        shutil.rmtree(ctx.out / ".embed", ignore_errors=True)
        row["embed"] = embed_src
        rows.append(row)
        checks += cs
    model = None
    if vision_out is not None and specs.text is not None and specs.path is not None:
        from stages.lib.checkpoints.streamed_model import load_streamed
        from stages.lib.parity.vision_effect import EFFECT_FIGURES, measure_vision_effect

        ctx.report("vision graph graded by its effect on the reference decoder (PyTorch)", 0.75)
        model = load_streamed(specs.path, dtype="fp32", trust_remote_code=bool(p["trust_remote_code"]))
        eff = measure_vision_effect(model, specs, samples, vision_out, noise, int(p["generate_tokens"]))
        row, cs = _gated_row("vision_effect", prec["vision"], p, "pytorch decoder", eff.figures, eff.per_sample,
                             {k: v for k, v in gate("vision").items() if k in EFFECT_FIGURES})
        rows.append(row | {"reason": "the reference decoder fed the quantized graph's image features"})
        checks += cs
    for g in graphs:
        s0 = samples[0]
        feeds = vf.vision_feeds(specs, s0) if g == "vision" else vf.decoder_feeds(qdir / f"{g}.onnx", specs, s0)
        # the reference names the graph's output when it is not the exporter's (a BYO ONNX)
        vname = (meta.get("outputs") or ["image_features"])[0]
        ref = {vname: s0["vision_features"]} if g == "vision" else {"logits": s0["logits"]}
        row, cs = _engine_row(ctx, g, prec[g], feeds, ref, gate(g))
        rows.append(row)
        checks += cs
    failed_graphs = {r["graph"] for r in rows if r["status"] == "fail"}
    if "generation" in failed_graphs:
        failed_graphs.add("decoder")
    if "vision_effect" in failed_graphs:
        failed_graphs.add("vision")
    want = [g for g in graphs if p["drilldown"] == "always" or (p["drilldown"] == "on-failure" and g in failed_graphs)]
    drill: dict[str, Any] = {}
    drill_notes = []
    if want and specs.path is None:  # BYO ONNX: no PyTorch model to capture per-block outputs from
        drill_notes.append(f"drill-down of {', '.join(want)} not run: a bring-your-own ONNX has no PyTorch model")
    elif want and specs.path is not None:
        from stages.lib.checkpoints.local import load_model
        from stages.lib.checkpoints.streamed_model import load_streamed
        from stages.lib.parity.drilldown_torch import drilldown_graph

        # a VLM streams its blocks (an 8 B model in FP32 is 35 GB); a CNN classifier loads whole
        load = load_model if specs.vision is None else load_streamed
        model = model or load(specs.path, dtype="fp32", trust_remote_code=bool(p["trust_remote_code"]))
        for g in want:
            ctx.report(f"drill-down: {g} per block", 0.9)
            drill[g] = drilldown_graph(ctx, g, qdir / f"{g}.onnx", specs, samples[0], model)
    not_run = [r["reason"] for r in rows if r["status"] == "not-run"]
    passed = all(c.passed for c in checks)
    doc = {"target": p["target"], "sm": p["sm"], "builder": p["builder"],
           "reference": {"samples": len(samples), "image_sizes": [s["image_size"] for s in meta["samples"]],
                         "held_out": meta.get("held_out"), "images": [s.get("image") for s in meta["samples"]],
                         "generate_tokens": int(p["generate_tokens"])},
           "rows": rows, "drilldown": drill, "passed": passed, "not_run": not_run}
    (ctx.out / "verify.json").write_text(json.dumps(doc, indent=1, default=float))
    summary = {f"{r['graph']}.{r['runtime']}": {"precision": r["precision"], "status": r["status"],
               **({"reason": r["reason"]} if r["reason"] else {}),
               **({"gated_on": r["gated_on"]} if r.get("gated_on") else {}),
               **{k: v for k, v in (r.get("figures") or {}).items() if isinstance(v, int | float | bool)}}
               for r in rows}
    metrics = {"rows": summary, "passed": passed, "not_run": not_run, "held_out": doc["reference"]["held_out"],
               "drilldown": {g: {"jump_block": d["jump"].get("block"), "why": d["jump"].get("why"),
                                 "blocks": [{k: b.get(k) for k in ("block", "cosine", "rel_l2", "max_abs")}
                                            for b in d["blocks"]]} for g, d in drill.items()}}
    gen_notes = [r["reason"] for r in rows if r["graph"] == "generation" and r["status"] != "not-run" and r["reason"]]
    result = StageResult(metrics=metrics, gates=checks, notes=[*not_run, *gen_notes, *drill_notes],
                         report=report_parts(p["target"], rows, drill))
    for g, d in drill.items():
        result.notes.append(f"drill-down {g}: {d['jump'].get('why')}")
    # raised here, not left to the worker: the line names the target and where the error jumps
    jumps = "; ".join(f"{g}: first jump at block {d['jump'].get('block')}" for g, d in drill.items())
    missed = missed_message(checks, head=f"parity gate missed on {p['target']}", hint=jumps)
    if missed:
        raise GateFailed(missed, result)
    return result


STAGE = Stage(
    name="verify",
    resources=node_resources("verify", gpu=True),
    # 4: bring-your-own ONNX (reference = the FP32 graph; no drill-down); 5: graphs run block by
    # block (segments), teacher-forced token agreement, free-running only under FREE_RUN_LIMIT;
    # 6: the report's parity table and drill-down plots come from the result; 7: token gates at
    # the decisive positions, the vision graph graded through the reference decoder (vision_effect);
    # 8: with a quantized KV cache the generated tokens are graded through it (a second pass)
    # 9: BYO vision rows grade each sample at the coarser of the gate and twice its noise floor
    version="9",
    run=_run,
    params=_params,
    external=checkpoint_reads(*ALL_ROLES),
    deps=("reference", "quantize", "engine", "checkpoint"),
    outputs=("verify.json",),
    per_target=True,
    toolchain=("onnxruntime", "onnx", "onnx-ir", "torch", "transformers", "matplotlib"),
    description="parity of the quantized graphs (and engines where they run) against the PyTorch reference",
    report_sections=((PARITY, "No comparison ran."),
                     (DRILLDOWN, "No drill-down ran (all gates met and verify.drilldown is not 'always').")),
)
