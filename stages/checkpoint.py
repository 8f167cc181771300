"""The first stage: produce or validate the model checkpoint every other stage reads.

``model.generate: tiny`` writes a random-weight checkpoint of ``model.family`` into the
stage's own folder (``checkpoint.json`` points at it relatively, so the cache entry is
relocatable). With only ``model.vision_onnx`` (bring your own ONNX) there is no checkpoint:
``checkpoint.json`` is ``{"path": null, "family": "byo"}``. A user checkpoint is validated in place and referenced by absolute path: its
weights are never copied, and its files are declared ``external`` so that their content,
not their path, enters the cache key.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.stage import Stage, StageContext, StageError, StageResult
from stages.lib.sizing import node_resources

if TYPE_CHECKING:
    from pipeline.config import BuildConfig
    from pipeline.targets import TargetSpec


def _params(cfg: BuildConfig, target: TargetSpec | None) -> dict[str, Any]:
    m = cfg.model
    return {
        "generate": m.generate,
        "family": m.family,
        "seed": m.seed,
        "checkpoint": str(m.checkpoint) if m.checkpoint is not None else None,
        "trust_remote_code": m.trust_remote_code,
    }


def _external(cfg: BuildConfig) -> list[Path]:
    if cfg.model.checkpoint is None:
        return []
    from stages.lib.checkpoints.local import checkpoint_files

    return checkpoint_files(cfg.model.checkpoint)


def _preflight(cfg: BuildConfig) -> None:
    """At plan time, from headers only: a supported family, complete safetensors, no pickles,
    no symlink out of the folder."""
    if cfg.model.checkpoint is not None:
        from stages.lib.checkpoints.local import preflight_checkpoint

        preflight_checkpoint(cfg.model.checkpoint, trust_remote_code=cfg.model.trust_remote_code)


def _run(ctx: StageContext) -> StageResult:
    from stages.lib.checkpoints import local as ck

    p = ctx.params
    path: str | None
    if p["generate"] == "tiny":
        from stages.lib.checkpoints.tiny import generate_tiny

        ctx.report(f"generating a tiny {p['family']} checkpoint", 0.1)
        generate_tiny(p["family"], ctx.out / "model", seed=int(p["seed"]))
        path, family = "model", p["family"]
        files = ck.checkpoint_files(ctx.out / "model")
    elif p["generate"] == "cnn-tiny":
        from stages.lib.export.cnn import generate_tiny_cnn  # the CNN (ResNet) path's own generator

        ctx.report("generating a tiny ResNet checkpoint", 0.1)
        generate_tiny_cnn(ctx.out / "model", seed=int(p["seed"]))
        path, family = "model", ck.detect_family(ctx.out / "model")
        files = ck.checkpoint_files(ctx.out / "model")
    elif p["generate"] is not None:
        raise StageError(f"model.generate: {p['generate']} is not produced by the checkpoint stage")
    elif p["checkpoint"] is None:
        # model.vision_onnx alone: the user's ONNX is the model (export_vision reads and declares
        # it); there are no weights here, and family "byo" tells the other stages so
        ctx.report("bring-your-own vision ONNX: no checkpoint", 0.1)
        path, family, files = None, ck.BYO_FAMILY, []
    else:
        root = Path(p["checkpoint"])
        ctx.report(f"validating {root}", 0.1)
        family = ck.detect_family(root)
        if p["family"] is not None and p["family"] != family:
            raise StageError(f"model.family is {p['family']} but {root}/config.json says {family}")
        files = ck.validate_checkpoint(root)
        path = str(root.resolve())
    (ctx.out / "checkpoint.json").write_text(json.dumps({"path": path, "family": family}, indent=2))
    weights = sum(f.stat().st_size for f in files if f.suffix == ".safetensors")
    return StageResult(
        metrics={"family": family, "generated": p["generate"] is not None, "weight_bytes": weights,
                 "files": len(files)},
    )


STAGE = Stage(
    name="checkpoint",
    resources=node_resources("checkpoint"),
    version="3",  # 3: the tiny Qwen3-VL has three deepstack layers (2: {"path": null} for BYO ONNX)
    run=_run,
    params=_params,
    deps=(),
    outputs=("checkpoint.json",),
    toolchain=("transformers", "tokenizers", "safetensors", "torch"),
    external=_external,
    preflight=_preflight,
    description="generate a tiny random checkpoint or validate a local Hugging Face one",
)
