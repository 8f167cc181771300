"""Export the language decoder (+ token embedding) to ONNX and prove it computes what PyTorch does.

Export (``DECODER_EXPORT``, recorded in the params): ``stamp`` traces the first few layers and
clones the last traced one for the rest (``stages/lib/decoder_stamp``: export time and memory do
not grow with depth, weights stream from the checkpoint one tensor at a time); ``trace`` exports
the whole loaded decoder in one trace. Both record the residual cut after each layer.

Outputs: ``decoder.onnx`` (one graph for prefill and decode; I/O in ``stages/lib/decoder_export``),
``embed.onnx`` (``input_ids`` -> ``inputs_embeds``), ``decoder.json`` (io spec, host spec for
``hostside/text.py``, parity figures). The image-feature merge is a host step
(``hostside.text.merge_image_features``), so the decoder graph never sees image placeholders.

Parity (``stages/lib/decoder_parity``): logits vs the FP32 PyTorch model on held-out shapes and a
greedy multimodal generation through embed + merge + decoder vs ``model.generate``. Image
features come from ``vision.onnx`` when the optional ``export_vision`` input is present, else
from the model's own vision tower (``vision_source`` in the metrics says which).

Gates: ``gates.export`` for FP32 exports, ``gates.fp16`` for FP16/BF16 ones. For reduced
precision, token agreement on a random tiny model can legitimately differ by a token once two
logits are near-tied, so it is gated only when the gate sets ``tokens`` (always reported).
"""

from __future__ import annotations

import gc
import json
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.stage import GateFailed, Stage, StageContext, StageError, StageResult, missed_message
from pipeline.worker import peak_rss_mb
from stages.lib.checkpoints.reads import checkpoint_reads
from stages.lib.parity.metrics import export_gate, gate_checks
from stages.lib.sizing import node_resources

if TYPE_CHECKING:
    from pipeline.config import BuildConfig
    from pipeline.targets import TargetSpec


# "stamp" | "trace": a module default rather than a config field (both export the same graph; a
# test or bench picks the other by patching it). A params entry, so switching re-keys the cache.
DECODER_EXPORT = "stamp"


def _params(cfg: BuildConfig, target: TargetSpec | None) -> dict[str, Any]:
    e, v = cfg.export, cfg.verify
    gate_name = export_gate(e.dtype, "export", "fp16")
    return {
        "dtype": e.dtype,
        "opset": e.opset,
        "sample_prompt_len": e.sample_prompt_len,
        "profile": cfg.profiles.decoder.model_dump(),
        "gate_name": gate_name,
        "gate": cfg.gates[gate_name].model_dump(),
        "verify": {"image_sizes": [list(s) for s in v.image_sizes], "prompt_len": v.prompt_len,
                   "generate_tokens": v.generate_tokens, "seed": v.seed},
        "trust_remote_code": cfg.model.trust_remote_code,
        "decoder_export": DECODER_EXPORT,
    }


def gate_figures(summary: dict[str, Any]) -> dict[str, float]:
    """The parity summary's gated figures under the gate's names: the greedy token agreement is
    ``tokens`` (the summary's ``tokens`` are the generated ids)."""
    return {**{k: summary[k] for k in ("cosine", "rel_l2", "max_abs", "norm_ratio", "top1")},
            "tokens": summary["token_agreement"]}


def _onnx_bytes(out: Path) -> int:
    return sum(f.stat().st_size for f in out.iterdir() if f.name.startswith(("decoder.onnx", "embed.onnx")))


def _run(ctx: StageContext) -> StageResult:
    import torch

    from stages.lib.checkpoints.local import (
        BYO_FAMILY,
        VISION_ONLY_FAMILIES,
        VLM_FAMILIES,
        checkpoint_family,
        load_config_hf,
        load_image_processor,
        resolve_checkpoint,
    )
    from stages.lib.export import decoder_graph as dg
    from stages.lib.hostside.generate import OrtPipeline
    from stages.lib.hostside.text import TextSpec
    from stages.lib.parity.decoder import run_parity

    p = ctx.params
    family = checkpoint_family(ctx.inputs["checkpoint"])
    if family in VISION_ONLY_FAMILIES or family == BYO_FAMILY:
        # a CNN backbone or a bring-your-own vision ONNX has no language decoder: say so, and
        # let fuse/quantize/engine skip it
        ctx.out.mkdir(parents=True, exist_ok=True)
        (ctx.out / "decoder.json").write_text(json.dumps({"absent": f"vision-only model ({family})"}, indent=2))
        return StageResult(metrics={"family": family, "decoder": "absent"},
                           notes=[f"{family} is vision-only: no decoder graph"])
    path, family = resolve_checkpoint(ctx.inputs["checkpoint"])
    if family not in VLM_FAMILIES:
        raise StageError(f"export_decoder needs a vision-language checkpoint ({', '.join(VLM_FAMILIES)}); got {family}")
    dtype, opset = p["dtype"], int(p["opset"])
    prof = p["profile"]
    seq = prof["seq"]
    if not seq["min"] <= int(p["sample_prompt_len"]) <= seq["max"]:
        raise StageError(f"export.sample_prompt_len {p['sample_prompt_len']} is outside profiles.decoder.seq "
                         f"({seq['min']}..{seq['max']})")
    # torch.export specialises sizes 0 and 1: trace with >= 2 on every dynamic axis.
    sample = {"batch": max(2, prof["batch"]["opt"]), "seq": int(p["sample_prompt_len"]),
              "past": max(2, min(prof["past"]["opt"], 8))}

    mode = p.get("decoder_export", DECODER_EXPORT)
    if mode not in ("stamp", "trace"):
        raise StageError(f"decoder_export must be stamp or trace, got {mode!r}")
    config = load_config_hf(path, p["trust_remote_code"])
    spec = TextSpec.from_config(family, config)
    n_deep = spec.deepstack_layers
    notes: list[str] = []
    if mode == "stamp":
        from stages.lib.export.decoder_stamp import stamp_blocker

        blocker = stamp_blocker(config.text_config, n_deep)
        if blocker:
            mode = "trace"
            notes.append(f"decoder exported by one whole trace, not stamped: {blocker}")
    dec_path, emb_path = ctx.out / "decoder.onnx", ctx.out / "embed.onnx"
    facts = _export(mode, ctx, path, family, n_deep, dtype, opset, sample)
    dg.finalize_graph(dec_path, facts["layers"], n_deep)
    export_seconds = facts["export_seconds"]
    export_rss = peak_rss_mb()
    # the reference is the FP32 model (its own vision tower and generate), its blocks streamed
    # from the shards (stages/lib/streamed_model: an 8 B model in FP32 is 35 GB); it runs the
    # checkpoint's own attention (eager), unpatched
    gc.collect()
    # A decoder past SEGMENT_ABOVE keeps at most a quarter of its graph's bytes of checkpoint
    # blocks between forwards: with the FP32 working set (the largest block, lm_head) and the
    # graphs' sessions after it, that holds the stage near its budget of 1.25x the graph + 2 GB
    # (keeping all 2.7 GB of the 1.43 B probe's blocks peaked at 6.1 GB against 4.9); the rest is
    # re-read from the page cache per forward, about a second per forward at that size.
    from stages.lib.checkpoints.streamed_model import load_streamed
    from stages.lib.segments.session import SEGMENT_ABOVE

    graph_bytes = sum(f.stat().st_size for f in ctx.out.glob("decoder.onnx*"))
    keep = graph_bytes // 4 if graph_bytes > SEGMENT_ABOVE else -1
    model = load_streamed(path, dtype="fp32", trust_remote_code=p["trust_remote_code"], keep_bytes=keep)
    ctx.report("parity: logits on held-out shapes + greedy generation", 0.6)
    vision_dir = ctx.inputs.get("export_vision")
    if vision_dir is not None and _vision_spec(vision_dir, family) is None:
        vision_dir = None  # not this checkpoint's Qwen vision graph (e.g. bring-your-own ONNX)
    image_processor = load_image_processor(path, bool(p["trust_remote_code"]))
    v = p["verify"]
    with tempfile.TemporaryDirectory() as tmp:  # widened BF16 copies: never beside the outputs
        run_dec, run_emb = dec_path, emb_path
        if dtype == "bf16":
            from stages.lib.export.bf16_widen import bf16_as_fp32

            run_dec = bf16_as_fp32(dec_path, Path(tmp) / "decoder_fp32.onnx")
            run_emb = bf16_as_fp32(emb_path, Path(tmp) / "embed_fp32.onnx")
            notes.append("bf16 widened to fp32 for onnxruntime CPU (no BF16 kernels): weight rounding is "
                         "checked, BF16 activation rounding is not")
        # a decoder over 2 GiB of weights runs block by block (a whole CPU session holds ~2x them);
        # embed and vision open when first run, after every PyTorch reference is made
        from stages.lib.ortsession import LazySession
        from stages.lib.segments.session import decoder_session

        dec_bytes = sum(f.stat().st_size for f in run_dec.parent.glob(run_dec.name + "*"))
        pipe = OrtPipeline.from_sessions(
            decoder_session(run_dec, dec_bytes, progress=lambda k, n: ctx.report(
                f"parity: decoder block {k + 1}/{n}, every case at once", 0.8 + 0.2 * k / n)),
            LazySession(run_emb), spec,
            LazySession(vision_dir / "vision.onnx") if vision_dir else None,
            _vision_spec(vision_dir, family) if vision_dir else None)
        if dec_bytes > SEGMENT_ABOVE:
            notes.append(f"decoder parity ran block by block ({dec_bytes / 1024**3:.2f} GiB of weights), all cases "
                         "in one pass; the greedy generation teacher-forced in it")
        with torch.no_grad():
            report = run_parity(pipe, model, image_processor, image_sizes=[tuple(s) for s in v["image_sizes"][:2]],
                                prompt_len=int(v["prompt_len"]), sample_seq=sample["seq"],
                                new_tokens=int(v["generate_tokens"]), seed=int(v["seed"]),
                                vision_source="onnx" if vision_dir else "torch",
                                report=lambda msg: ctx.report(f"parity: {msg}", 0.7))
        del pipe
    summary = report.summary()
    checks = gate_checks("decoder", gate_figures(summary), p["gate"])
    notes += [f"{case} failed to run: {msg}" for case, msg in summary["errors"].items()]
    if summary["vision_source"] == "torch":
        notes.append("decoder parity used the PyTorch vision tower for image features (no export_vision input)")
    if p["gate"].get("tokens") is None:
        notes.append(f"token agreement {summary['token_agreement']:.3f} reported, not gated (gates.{p['gate_name']}.tokens unset)")
    metrics = {
        "family": family, "dtype": dtype, "opset": opset, "exporter": facts["exporter"], "decoder_export": mode,
        "template_layers": facts.get("template_layers", facts["layers"]),
        **{k: summary[k] for k in ("cosine", "max_abs", "rel_l2", "norm_ratio", "top1", "token_agreement", "vision_source",
                                   "generation")},
        "export_seconds": round(export_seconds, 3), "export_peak_rss_mb": round(export_rss, 1),
        "peak_rss_mb": round(peak_rss_mb(), 1), "onnx_bytes": _onnx_bytes(ctx.out),
    }
    io = dg.io_spec(dec_path)
    meta = {**io, "embed": dg.io_spec(emb_path), "profile": prof, "dtype": dtype, "opset": opset,
            "family": family, "host": spec.as_dict(), "sample": sample, "exporter": facts["exporter"],
            "decoder_export": mode,
            "semantics": SEMANTICS,
            "parity": {**summary, "gate": p["gate_name"], "gates": [c.__dict__ for c in checks]}}
    (ctx.out / "decoder.json").write_text(json.dumps(meta, indent=2))
    result = StageResult(metrics=metrics, gates=checks, notes=notes)
    if summary["errors"]:  # a case that did not run is why figures miss: the failure line says which
        case, msg = next(iter(summary["errors"].items()))
        missed = missed_message(checks, hint=f"{len(summary['errors'])} case(s) did not run, first {case}: {msg}")
        if missed:
            raise GateFailed(missed, result)
    return result  # a miss without that context fails the node in the worker, from the gates


def _export(mode: str, ctx: StageContext, path: Path, family: str, n_deep: int, dtype: str, opset: int,
            sample: dict[str, int]) -> dict[str, Any]:
    """decoder.onnx + embed.onnx into ``ctx.out``; the export facts (seconds cover both graphs)."""
    from stages.lib.export import decoder as dx

    trust = bool(ctx.params["trust_remote_code"])
    dec_path, emb_path = ctx.out / "decoder.onnx", ctx.out / "embed.onnx"
    if mode == "stamp":
        from stages.lib.export.decoder_stamp import export_stamped
        from stages.lib.export.lazy_weights import export_embed_lazy

        ctx.report(f"exporting the {family} decoder (template layers traced, the rest stamped)", 0.1)
        facts = export_stamped(path, family, n_deep, dec_path, dtype, opset, sample, trust)
        t0 = time.perf_counter()
        export_embed_lazy(path, dtype, emb_path, opset)
    else:
        from stages.lib.export.decoder_load import load_decoder

        ctx.report(f"loading the {family} decoder in {dtype}", 0.05)
        # the language model only, streamed: one copy of the decoder weights during export
        model = load_decoder(path, dtype=dtype, trust_remote_code=trust)
        ctx.report("exporting decoder (torch.onnx dynamo)", 0.1)
        facts = dx.export_decoder_graph(model, family, n_deep, dec_path, dtype, opset, sample)
        t0 = time.perf_counter()
        dx.export_embed_graph(dx.embed_table(model), emb_path, opset)
        del model
    return {**facts, "export_seconds": facts["export_seconds"] + time.perf_counter() - t0}


SEMANTICS = {
    "attention_mask": "[batch, past+seq] int64, 1 = real token, 0 = left padding; causal mask built in-graph",
    "position_ids": "[3, batch, seq] int64 M-RoPE rows (t, h, w): hostside.text.rope_index for the prompt, "
                    "decode_position_ids after it",
    "past_key_values": "[batch, kv_heads, past, head_dim] per layer; past = 0 for the first call",
    "present": "[batch, kv_heads, past+seq, head_dim]: the next call's past",
    "deepstack_embeds": "Qwen3-VL: [batch, seq, hidden] dense, zero at non-visual positions, added after "
                        "decoder layer K (hostside.text.scatter_deepstack); zeros for decode steps",
    "logits": "[batch, seq, vocab] in the graph dtype",
    "embed": "embed.onnx: input_ids [batch, seq] -> inputs_embeds; image features replace the image "
             "placeholder rows on the host (hostside.text.merge_image_features)",
}


def _vision_spec(vision_dir: Path, family: str) -> Any:
    """The export_vision host spec when that graph is this family's Qwen vision encoder, else None."""
    from stages.lib.hostside.vision import VisionSpec

    meta_file = vision_dir / "vision.json"
    if not (vision_dir / "vision.onnx").is_file() or not meta_file.is_file():
        return None
    spec = json.loads(meta_file.read_text()).get("spec")
    if not isinstance(spec, dict) or spec.get("family") != family:
        return None
    return VisionSpec.from_dict(spec)


STAGE = Stage(
    name="export_decoder",
    resources=node_resources("export_decoder"),
    # 3: {absent} decoder.json for a bring-your-own vision ONNX (family byo); 4: stamped export by
    # default (decoder_export), the residual cut list recorded in decoder.onnx; 5: above 2 GiB
    # the parity cases run in one block-by-block pass, generation teacher-forced in it
    version="5",
    run=_run,
    params=_params,
    external=checkpoint_reads("model", "processor"),
    # export_vision: decoder parity then generates through vision.onnx, so the three exported
    # pieces (vision, embed + merge, decoder) are proven together, not only the decoder alone
    deps=("checkpoint", "export_vision"),
    # decoder.onnx and embed.onnx are written for vision-language models only; a vision-only
    # (CNN) checkpoint gets decoder.json {"absent": ...}, so only that file is declared required.
    outputs=("decoder.json",),
    toolchain=("torch", "transformers", "onnx", "onnxruntime", "onnxscript"),
    description="export the language decoder (KV cache, M-RoPE) and token embedding to ONNX with parity gates",
)
