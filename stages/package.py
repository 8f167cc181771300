"""package@T: one archive per target with everything a device needs to run and check the build.

Inputs: engine@T (engines, sidecars, layer reports), quantize@T (the quantized ONNX graphs and
their io specs), checkpoint (tokenizer, processor and generation files), reference (the
held-out probe set) and verify@T (the parity figures the package carries).
Outputs: ``package.tar`` (uncompressed, deterministic: same inputs, same sha256) and
``manifest.json`` (the same bytes as the tar's copy); the spine delivers the tar as
``artifacts/packages/<config>-<target>-<key16>.tar``. The format is in
``stages/lib/packaging/layout.py``; the work in ``stages.lib.packaging.assemble``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.stage import Stage, StageContext, StageResult
from stages.lib.checkpoints.reads import checkpoint_reads
from stages.lib.sizing import node_resources

if TYPE_CHECKING:
    from pipeline.config import BuildConfig
    from pipeline.targets import TargetSpec


def include_onnx(cfg: BuildConfig) -> bool:
    """``package.onnx`` (default on): ship the graphs beside the engines."""
    return cfg.package.onnx


def _params(cfg: BuildConfig, target: TargetSpec | None) -> dict[str, Any]:
    assert target is not None, "package is a per-target stage"
    from pipeline import __version__
    from stages.lib.packaging.layout import FORMAT_VERSION

    return {
        "name": cfg.name,
        "precision": {g: target.resolve_precision(getattr(cfg.precision, g))[0] for g in ("vision", "decoder")},
        "gates": {k: g.model_dump(mode="json") for k, g in sorted(cfg.gates.items())},
        "onnx": include_onnx(cfg),
        "format": FORMAT_VERSION,
        "vlmforge": __version__,  # written into the manifest (created_by)
    }


def _model_files(cfg: BuildConfig) -> list[Path]:
    """config.json (M-RoPE sections, special token ids) and generation_config.json: files of
    the "model" role the package reads, declared one by one (the weights are not read)."""
    ckpt = cfg.model.checkpoint
    if ckpt is None:
        return []
    return [p for p in (Path(ckpt) / "config.json", Path(ckpt) / "generation_config.json") if p.is_file()]


def _run(ctx: StageContext) -> StageResult:
    from stages.lib.packaging import assemble, digest_params

    assert ctx.target is not None, "package is a per-target stage"
    p = ctx.params
    res = assemble(ctx.out, ctx.inputs, name=p["name"], target=ctx.target, gates=p["gates"],
                   include_onnx=bool(p["onnx"]), config_digest=digest_params(p), report=ctx.report)
    files = res.doc["files"]
    metrics = {"bytes": res.bytes, "sha256": res.sha256, "files": len(files) + 1, "graphs": res.doc["graphs"],
               "onnx": res.doc["onnx"]["included"], "compat": res.doc["compat"],
               "engine_bytes": sum(v["bytes"] for k, v in files.items() if k.endswith(".engine"))}
    return StageResult(metrics=metrics, notes=res.notes)


STAGE = Stage(
    name="package",
    resources=node_resources("package"),
    # 2: probe.json says what a decisive position must clear (noise); generated_margin probed;
    # 3: the manifest names a quantized KV cache (precision.kv_cache)
    version="3",
    run=_run,
    params=_params,
    deps=("engine", "quantize", "checkpoint", "reference", "verify"),
    outputs=("package.tar", "manifest.json"),
    deliver=("package.tar",),
    per_target=True,
    toolchain=("numpy",),
    external=checkpoint_reads("tokenizer", "processor", plus=_model_files),
    description="one deterministic archive per target: engines, ONNX, tokenizer, runtime spec, probe set",
)
