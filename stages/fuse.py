"""Fuse: graph rewrites that make the engines fast, with numerics checked unchanged.

Per graph (vision, decoder): cleanup → fold BN into Conv → attention into one ONNX
``Attention`` node (opset ≥ 23) or TensorRT's canonical MHA pattern → cleanup → tag fusible
partitions for the Q/DQ stage (``stages.lib.fusion.annotate``). ``embed.onnx`` (a Gather) and
the io specs pass through unchanged. Each rewritten graph runs against its input graph in
onnxruntime on random inputs shaped from the io spec; a difference beyond the graph dtype's
tolerance is a StageError. Vision-only checkpoints (a CNN tower) have no decoder: the
decoder/embed outputs are then absent (docs/CONTRACT.md, "Fusion annotations").
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.stage import Stage, StageContext, StageError, StageResult
from stages.lib.sizing import node_resources

if TYPE_CHECKING:
    from pipeline.config import BuildConfig
    from pipeline.targets import TargetSpec

# max |fused − original| allowed, relative to max(1, max |original|), in the graph's own dtype:
# FP32 rewrites only reassociate a scale; FP16 ones also drop the FP32 Cast around Softmax.
TOLERANCE = {"float32": 1e-5, "float16": 2e-2, "bfloat16": 5e-2}
# Sizes for named axes: a small prefill (seq 8 after past 8) clamped into the io spec's profile
# range; the "total" axes are then derived (seq + past) so mask and cache inputs agree.
AXES = {"batch": 1, "seq": 8, "sequence": 8, "past": 8, "past_seq": 8, "past_len": 8,
        "images": 1, "num_images": 1, "height": 64, "width": 64}
TOTAL_AXES = ("total", "total_seq", "kv_len")
SEED = 0  # fixed: the numerics check must not re-key when an unrelated config seed changes


def _params(cfg: BuildConfig, target: TargetSpec | None) -> dict[str, Any]:
    f = cfg.fuse
    # a bring-your-own FP32 vision graph is brought to export.dtype fp16 here (fusion.half)
    half = cfg.model.vision_onnx is not None and cfg.export.dtype == "fp16"
    return {"fold_batchnorm": f.fold_batchnorm, "attention": f.attention, "cleanup": f.cleanup,
            "opset": cfg.export.opset, "byo_fp16": half}


def _axis_sizes(io_spec: dict[str, Any]) -> dict[str, int]:
    """Named-axis sizes: ``AXES`` (else 4) clamped into the io spec profile's [min, max]."""
    sizes = dict(AXES)
    for name, rng in (io_spec.get("profile") or {}).items():
        if isinstance(rng, dict) and all(isinstance(rng.get(k), int) for k in ("min", "max")):
            sizes[name] = min(max(rng["min"], AXES.get(name, 4), 1), rng["max"])
    seq = sizes.get("seq", AXES["seq"])
    past = sizes.get("past", AXES["past"])
    sizes.update({k: seq + past for k in TOTAL_AXES})
    return sizes


def fuse_graph(src: Path, dst: Path, params: dict[str, Any], io_spec: dict[str, Any], seed: int,
               external_above: int | None = None, half: bool = False) -> dict[str, Any]:
    """Rewrite one graph file into ``dst``; returns its fuse.json entry (StageError on drift).

    ``dst`` is whole in its own folder: with tensors over ``external_above`` bytes (default
    ``graphio.EXTERNAL_DATA_BYTES``, as the exporters) they go to ``<dst>.data``, written here;
    otherwise inline, also when ``src`` had them external. ``half``: an FP32 graph leaves in FP16
    (inputs and outputs stay FP32), checked at the FP16 tolerance."""
    import onnx
    import onnx_ir as ir

    from stages.lib.fusion import apply_rules, op_histogram, resolve_attention_mode
    from stages.lib.fusion.check import compare, ort_run, random_feeds
    from stages.lib.fusion.half import is_float32, to_float16
    from stages.lib.qdq import graphio

    t0 = time.time()
    model = ir.load(src)
    opset = int(model.opset_imports.get("", params["opset"]))
    try:
        mode = resolve_attention_mode(params["attention"], opset)
    except ValueError as e:
        raise StageError(f"{src.name}: {e}") from None
    ops_before = op_histogram(model)
    report = apply_rules(model, attention=mode, fold_batchnorm=params["fold_batchnorm"], cleanup=params["cleanup"])
    computes_fp32 = is_float32(model)
    converted = half and computes_fp32
    if converted:
        to_float16(model)
    ops_after = op_histogram(model)
    graphio.save(model, dst, graphio.EXTERNAL_DATA_BYTES if external_above is None else external_above)
    del model  # ORT reads both graphs from disk, one session at a time: one copy of the weights
    feeds = random_feeds(onnx.load(str(src), load_external_data=False), _axis_sizes(io_spec), seed=seed)
    shapes = {k: list(v.shape) for k, v in feeds.items()}
    try:
        ort_run(str(src), feeds)
    except Exception as e:  # noqa: BLE001 - ORT raises its own types; one line for the user
        raise StageError(f"{src.name}: the exported graph does not run on inputs shaped from its io spec "
                         f"{shapes}: {str(e).splitlines()[0][:300]}") from None
    try:
        cmp = compare(str(src), str(dst), feeds)
    except Exception as e:  # noqa: BLE001
        raise StageError(f"{src.name}: the fused graph no longer runs like the original: "
                         f"{str(e).splitlines()[0][:300]}") from None
    dtype = cmp["per_output"][0]["dtype"] if cmp["per_output"] else "float32"
    if dtype == "float32" and (converted or not computes_fp32):  # FP32 outputs of an FP16 graph
        dtype = "float16"
    tol = TOLERANCE.get(dtype, 1e-5) * max(1.0, cmp["ref_max"])
    entry = {
        "opset": opset, "attention_mode": mode, **report, "converted_to": "float16" if converted else None,
        "nodes_before": sum(ops_before.values()), "nodes_after": sum(ops_after.values()),
        "ops_before": ops_before, "ops_after": ops_after,
        "check": {"dtype": dtype, "max_abs": cmp["max_abs"], "ref_max": cmp["ref_max"], "tolerance": tol,
                  "inputs": shapes},
        "seconds": round(time.time() - t0, 2),
    }
    if not cmp["max_abs"] <= tol:
        raise StageError(f"{src.name}: fusion changed the outputs by {cmp['max_abs']:.3g} "
                         f"(> {tol:.3g} allowed in {dtype}); rerun with "
                         + ("export.dtype: fp32 to keep the graph FP32" if converted else "fuse.attention: off to isolate"))
    return entry


def _run(ctx: StageContext) -> StageResult:
    p = ctx.params
    vis_dir = ctx.inputs["export_vision"]
    dec_dir = ctx.inputs.get("export_decoder")
    if not (vis_dir / "vision.onnx").is_file():
        raise StageError(f"{vis_dir}/vision.onnx is missing: export_vision did not produce it")
    jobs = [("vision", vis_dir)]
    if dec_dir is not None and (dec_dir / "decoder.onnx").is_file():
        jobs.append(("decoder", dec_dir))
    ctx.out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {"params": p, "graphs": {}}
    metrics: dict[str, Any] = {}
    for i, (g, folder) in enumerate(jobs):
        ctx.report(f"fusing {g}.onnx", i / len(jobs))
        spec_path = folder / f"{g}.json"
        io_spec = json.loads(spec_path.read_text()) if spec_path.is_file() else {}
        entry = fuse_graph(folder / f"{g}.onnx", ctx.out / f"{g}.onnx", p, io_spec, SEED + i,
                           half=g == "vision" and bool(p.get("byo_fp16")))
        summary["graphs"][g] = entry
        if spec_path.is_file():
            shutil.copyfile(spec_path, ctx.out / spec_path.name)
        metrics[g] = {"nodes_before": entry["nodes_before"], "nodes_after": entry["nodes_after"],
                      "mha_groups": entry["mha_groups"], "unfused_softmax": entry["unfused_softmax"],
                      "conv_act_groups": entry["conv_act_groups"], "max_abs": entry["check"]["max_abs"],
                      **({"converted_to": entry["converted_to"]} if entry["converted_to"] else {}),
                      "matches": {k: v["matches"] for k, v in entry["rules"].items()}}
    if len(jobs) == 2:  # the embedding table and its spec go through untouched
        # copies, not hard links (which would save 1.2 GB here and a decoder's 16 GB at 8 B):
        # onnx's external-data loader, onnx.checker and onnx-ir all refuse a data file with more
        # than one link ("potential hardlink attack"), so every later reader would fail
        for name in ("embed.onnx", "embed.onnx.data", "embed.json"):
            if (dec_dir / name).is_file():  # type: ignore[operator]
                shutil.copyfile(dec_dir / name, ctx.out / name)  # type: ignore[operator]
        if not (ctx.out / "embed.onnx").is_file():
            raise StageError(f"{dec_dir}/embed.onnx is missing: export_decoder did not produce it")
    summary["decoder"] = "fused" if len(jobs) == 2 else "absent (vision-only model)"
    (ctx.out / "fuse.json").write_text(json.dumps(summary, indent=1))
    notes = [f"{g}: {m['nodes_before']} -> {m['nodes_after']} nodes, {m['mha_groups']} MHA, "
             f"{m['conv_act_groups']} conv+act partitions"
             + (f", FP32 graph converted to {m['converted_to']}" if m.get("converted_to") else "")
             for g, m in metrics.items()]
    loose = {g: m["unfused_softmax"] for g, m in metrics.items() if m["unfused_softmax"]}
    if loose:
        notes.append(f"Softmax nodes left outside any MHA pattern: {loose}")
    return StageResult(metrics=metrics, notes=notes)


STAGE = Stage(
    name="fuse",
    resources=node_resources("fuse"),
    # 6: Conv→[BN]→Add without an activation tagged as a partition (placement reads the tags);
    # 5: the before/after check runs block by block (4: graphs saved whole in their own folder)
    # 7: legacy (opset < 13) Softmax folded before attention; a BYO FP32 graph leaves in FP16
    version="7",
    run=_run,
    params=_params,
    deps=("export_vision", "export_decoder"),
    # decoder.onnx, embed.onnx, decoder.json (embed.json) are written too when the model has a
    # decoder; a vision-only (CNN) model has none, so they cannot be declared as required.
    outputs=("vision.onnx", "fuse.json"),
    toolchain=("onnx", "onnxscript", "onnx-ir", "onnxruntime"),
    description="graph fusion: BN folding, attention to ONNX Attention / canonical MHA, cleanup",
)
