"""Export the vision encoder to ONNX and prove it computes what PyTorch computes.

Graph: patchified pixels + host-precomputed tensors (``stages.lib.hostside.vision``) ->
``image_features`` (+ Qwen3-VL ``deepstack_features``), dynamic in the number of patches,
so one graph serves several images of several sizes.

Exporter: ``torch.export`` -> ``torch.onnx.export(dynamo=True, optimize=False)`` -> our
``fusion.cleanup`` (the optimizer fuse runs too), TorchScript as a fallback.
Once the attention patch removes the per-image ``tolist()`` split, both trace the encoder and
give the same numerics (cosine 1 - 4e-13 on all three families). Dynamo wins on memory, which
the issue makes a requirement: on a ~1B-parameter config (0.56 GB FP16 encoder) its peak RSS
was 1.11 GB (external data, weights referenced, not copied) against 2.8 GB for TorchScript,
which serialises the whole proto in memory. TorchScript is ~20x faster on the tiny test
models (0.4 s vs ~9 s), which is why it remains the fallback and not the default.

Parity runs in the stage (``stages.lib.parity.vision``): ONNX in onnxruntime (CPU) vs the
*unpatched* FP32 PyTorch encoder on the verify image sizes (not the export sample's) one at a
time and all at once. Its worst figures are gated (``gates.export`` for FP32, ``gates.fp16`` for
FP16/BF16; a CNN tower likewise); a miss fails the node.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.stage import Stage, StageContext, StageError, StageResult
from pipeline.worker import peak_rss_mb
from stages.lib.checkpoints.reads import checkpoint_reads
from stages.lib.parity.metrics import Parity, export_gate, gate_checks
from stages.lib.sizing import node_resources

if TYPE_CHECKING:
    from pipeline.config import BuildConfig
    from pipeline.targets import TargetSpec

# "stamp": one block of each kind traced, the others cloned with their own weights
# (stages.lib.export.vision_stamp; every block is traced where stamping refuses); "trace": every block
VISION_EXPORT = "stamp"


def _params(cfg: BuildConfig, target: TargetSpec | None) -> dict[str, Any]:
    e, vp, src = cfg.export, cfg.profiles.vision, cfg.model.vision_onnx
    return {
        "dtype": e.dtype,
        "opset": e.opset,
        "vision_export": VISION_EXPORT,
        "fp32_vision_blocks": list(e.fp32_vision_blocks),
        "sample_image": list(e.sample_image),
        "profile": {"min_image": list(vp.min_image), "opt_image": list(vp.opt_image),
                    "max_image": list(vp.max_image), "max_images": vp.max_images},
        "vision_onnx": None if src is None else {**src.preprocess(vp), "path": str(src.path)},
        "gate": cfg.gates["export"].model_dump(),
        "gate_fp16": cfg.gates["fp16"].model_dump(),
        "verify_sizes": [list(s) for s in cfg.verify.image_sizes],
        "seed": cfg.verify.seed,
        "trust_remote_code": cfg.model.trust_remote_code,
    }


def _external(cfg: BuildConfig) -> list[Path]:
    src = cfg.model.vision_onnx
    if src is None:
        return []
    data = src.path.with_name(src.path.name + ".data")
    return [src.path, *([data] if data.is_file() else [])]


def check_sizes(params: dict[str, Any]) -> None:
    prof = params["profile"]
    lo, hi = prof["min_image"], prof["max_image"]
    named = [("export.sample_image", params["sample_image"])]
    named += [(f"verify.image_sizes[{i}]", s) for i, s in enumerate(params["verify_sizes"])]
    for what, (h, w) in named:
        if not (lo[0] <= h <= hi[0] and lo[1] <= w <= hi[1]):
            raise StageError(f"{what} {h}x{w} is outside profiles.vision ({lo[0]}x{lo[1]} .. {hi[0]}x{hi[1]})")
    if min(2, len(params["verify_sizes"])) > prof["max_images"]:
        raise StageError(f"parity runs {len(params['verify_sizes'])} images at once but "
                         f"profiles.vision.max_images is {prof['max_images']}")


def _run(ctx: StageContext) -> StageResult:
    from stages.lib.checkpoints.local import VISION_ONLY_FAMILIES, resolve_checkpoint

    p = ctx.params
    if p["vision_onnx"] is not None:
        return bring_your_own(ctx)
    path, family = resolve_checkpoint(ctx.inputs["checkpoint"])
    check_sizes(p)
    if family in VISION_ONLY_FAMILIES:
        from stages.lib.export.cnn import export_cnn  # CNN backbones: exported by the fusion work's module

        metrics = export_cnn(path, ctx.out, p)
        gate = export_gate(p["dtype"], p["gate"], p["gate_fp16"])
        return StageResult(metrics=metrics, gates=gate_checks("vision", Parity(**metrics["parity"]), gate))
    from stages.lib.export import vision as vision_export
    from stages.lib.parity import vision as vision_parity

    return vision_parity.verify(ctx, path, family, vision_export.export(ctx, path, family))


STAGE = Stage(
    name="export_vision",
    resources=node_resources("export_vision"),
    version="7",  # 7: BYO fit: keep-aspect (dynamic H/W); 6: BYO graphs below opset 19 upgraded at import; 5: blocks stamped (vision_stamp); 4: optimised by fusion.cleanup, not torch's optimize=True; 3: BYO check image preprocessed by ImageFeeder
    run=_run,
    params=_params,
    deps=("checkpoint",),
    outputs=("vision.onnx", "vision.json"),
    toolchain=("torch", "transformers", "onnx", "onnxruntime"),
    external=checkpoint_reads("model", "processor", plus=_external),
    description="export the vision encoder to ONNX (dynamic patches) with an onnxruntime parity gate",
)


def bring_your_own(ctx: StageContext) -> StageResult:
    """A user's FP32 ONNX as vision.onnx: validated, run once in ORT; it is its own reference."""
    import shutil

    import numpy as np
    import onnx

    from stages.lib.ortsession import ort_session

    src = ctx.params["vision_onnx"]
    t0 = time.perf_counter()
    import onnx_ir as ir

    from stages.lib.qdq import graphio
    from stages.lib.qdq.model_tensors import has_external

    onnx.checker.check_model(src["path"])  # by path: works past 2 GB and with external data
    model = onnx.load(src["path"], load_external_data=False)
    inputs = {i.name: i for i in model.graph.input}
    if src["input_name"] not in inputs:
        raise StageError(f"model.vision_onnx.input_name {src['input_name']!r} is not an input of {src['path']} "
                         f"(inputs: {', '.join(inputs)})")
    from stages.lib.export.opset import TARGET_OPSET, upgrade

    dst = ctx.out / "vision.onnx"
    upgraded_from = upgrade(Path(src["path"]), dst)  # an old opset: upgraded here, never failing later
    if upgraded_from is not None:
        model = onnx.load(str(dst), load_external_data=False)
    elif has_external(model):  # whole in our folder, whatever the user's data file is called
        graphio.save(ir.load(src["path"]), dst)
    else:
        shutil.copyfile(src["path"], dst)  # self-contained: the user's bytes, unchanged
    sess = ort_session(dst)
    meta = sess.get_inputs()
    from stages.lib.qdq.calibset import ImageFeeder, Sample

    h, w = src["resize"] if src.get("fit") != "keep-aspect" else src["opt_image"]
    if src.get("fit") == "keep-aspect":  # sizes vary per image: the graph must take any H and W
        dims = list(inputs[src["input_name"]].type.tensor_type.shape.dim)
        fixed = [d.dim_value for d in (dims[1:3] if src["layout"] == "NHWC" else dims[2:4]) if d.HasField("dim_value")]
        if len(dims) != 4 or fixed:
            raise StageError(f"{src['path']}: input {src['input_name']} has fixed H/W ({'x'.join(map(str, fixed))}); "
                             "model.vision_onnx.fit: keep-aspect needs a graph dynamic in H and W (or fit: resize)")
    rng = np.random.default_rng(ctx.params["seed"])
    # the one implementation of the declared preprocessing (calibrate, reference and quantize
    # feed the graph through it too), on an 8-bit image of another size than the resize
    img = rng.integers(0, 256, (h + 7, w + 5, 3), dtype=np.uint8)
    feeds = ImageFeeder({"preprocess": src}).vision(Sample("export-check", img, ""))[0]
    extra = [i.name for i in meta if i.name not in feeds]
    if extra:
        raise StageError(f"{src['path']} has inputs besides {src['input_name']!r}: {', '.join(extra)}")
    outs = sess.run(None, feeds)
    if not all(np.isfinite(o).all() for o in outs if np.issubdtype(o.dtype, np.floating)):
        raise StageError(f"{src['path']} produces non-finite outputs on a normalised random image")
    notes = [f"bring-your-own ONNX {src['path']}: parity reference is the graph itself"]
    if upgraded_from is not None:  # the converted graph must compute what the user's computes
        from stages.lib.parity.metrics import compare

        orig = ort_session(Path(src["path"])).run(None, feeds)
        worst = min(compare(a, b).cosine for a, b in zip(outs, orig, strict=True))
        if not worst >= 0.99999:
            raise StageError(f"{src['path']}: upgraded from opset {upgraded_from} to {TARGET_OPSET}, the graph's outputs "
                             f"changed (cosine {worst:.6f} vs the original); re-export it at opset >= {TARGET_OPSET}")
        notes.append(f"upgraded from opset {upgraded_from} to {TARGET_OPSET} (onnx version converter; outputs match the "
                     f"original at cosine {worst:.6f}); the reference runs the original file")

    def shape(v: Any) -> list[Any]:
        return [d if isinstance(d, int) else str(d) for d in v.shape]

    (ctx.out / "vision.json").write_text(json.dumps({
        "inputs": [{"name": i.name, "dtype": i.type.removeprefix("tensor(").rstrip(")"), "shape": shape(i)} for i in meta],
        "outputs": [{"name": o.name, "dtype": o.type.removeprefix("tensor(").rstrip(")"), "shape": shape(o)}
                    for o in sess.get_outputs()],
        "profile": {"image": [h, w], "batch": shape(meta[0])[0]},
        "dtype": "fp32", "opset": max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0),
        "family": "byo", "preprocess": {k: v for k, v in src.items() if k != "path"},
        "parity": {"reference": "itself in onnxruntime fp32", "output_shapes": [list(o.shape) for o in outs]},
    }, indent=2))
    return StageResult(metrics={"export_seconds": round(time.perf_counter() - t0, 3), "onnx_bytes": dst.stat().st_size,
                                "opset_upgraded_from": upgraded_from,
                                "peak_rss_bytes": round(peak_rss_mb() * 2**20), "cosine": 1.0, "dtype": "fp32", "family": "byo"},
                       notes=notes)
