"""Calibrate: per-tensor activation ranges of the fused vision and decoder graphs.

Runs the graphs themselves in onnxruntime on the calibration set (a folder of images plus a
JSONL of prompts, or the deterministic synthetic set), streaming: each sample updates running
histograms and is dropped. The vision graph runs whole, sample by sample; the decoder (a 7-8B one
cannot run whole in one CPU session) runs block by block (`stages.lib.segments.runner`, cut where the
model's `vlmforge.segment_cuts` says): every sample's decoder feed is built first (embeddings,
small), then all samples go through segment k before segment k+1, each segment exposing only
the calibrated tensors it makes. Its own cached artifact, so changing only the Q/DQ recipe (mode,
keep patterns, budget) re-runs `quantize` and not this.

Outputs: `ranges_<graph>.json` {"graph", "method", "percentile", "samples", "source",
"order": [tensor...], "tensors": {name: {"amax", "amax_fp8", "max_abs", "min", "max", "shape",
"producer"}}}: the inputs of the ops Q/DQ goes on, and the decoder's present.* KV outputs (a
quantized cache's scales); `ranges_<graph>.npz` (per tensor index i in "order": hist_i [2048] counts of
|x|, width_i bin width, for MatMul/Gemm inputs per input channel: chan_ms_i E[x_k^2], chan_amax_i
max |x_k| and chan_amax_halves_i [2, K] the max over the even / odd samples), plus
`feeds_<graph>.npz` (s{i}.<input>: the first calibration samples' graph inputs, which quantize's
sensitivity search ranks layers on, so the held-out set only grades the result).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.stage import Stage, StageContext, StageError, StageResult
from stages.lib.checkpoints.reads import ALL_ROLES, checkpoint_reads
from stages.lib.sizing import node_resources

if TYPE_CHECKING:
    from pipeline.config import BuildConfig
    from pipeline.targets import TargetSpec

GRAPHS = ("vision", "decoder")
KEEP_FEEDS = 2  # calibration feeds kept for quantize's sensitivity search (held-out data grades it)


def _params(cfg: BuildConfig, target: TargetSpec | None) -> dict[str, Any]:
    c = cfg.calibration
    return {
        "source": c.source,
        "images": str(c.images) if c.images else None,
        "prompts": str(c.prompts) if c.prompts else None,
        "samples": c.samples,
        "image_sizes": [list(s) for s in c.image_sizes],
        "prompt_len": c.prompt_len,
        "method": c.method,
        "percentile": c.percentile,
        "seed": c.seed,
        "trust_remote_code": cfg.model.trust_remote_code,
    }


def _external(cfg: BuildConfig) -> list[Path]:
    """The folder's images and the prompts file: their content enters the cache key."""
    c = cfg.calibration
    if c.source != "folder" or c.images is None:
        return []
    from stages.lib.qdq.calibset import IMAGE_SUFFIXES

    try:
        files = sorted(p for p in c.images.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    except OSError:  # missing/unreadable: the stage itself raises the one-line error at run time
        files = []
    return [*files, c.prompts] if c.prompts is not None and c.prompts.is_file() else files


def samples(p: dict[str, Any], resizes_itself: bool = False) -> Any:
    """The calibration samples. ``resizes_itself``: the graph's own preprocessing resizes every
    image (a BYO ONNX), so a folder's images are read as they are, resized once, there."""
    from stages.lib.qdq import calibset

    sizes = [tuple(s) for s in p["image_sizes"]]
    if p["source"] == "folder":
        return calibset.folder_samples(Path(p["images"]), Path(p["prompts"]) if p["prompts"] else None,
                                       int(p["samples"]), None if resizes_itself else sizes)
    return calibset.synthetic_samples(int(p["samples"]), sizes, int(p["seed"]))


def graph_path(folder: Path, name: str) -> Path:
    path = folder / f"{name}.onnx"
    if not path.is_file():
        raise StageError(f"{path} is missing: the fuse stage did not produce {name}.onnx")
    return path


def _run(ctx: StageContext) -> StageResult:
    from stages.lib.checkpoints.local import resolve_checkpoint
    from stages.lib.qdq import calibrators as C
    from stages.lib.qdq import graphio
    from stages.lib.qdq.calibset import Feeder, ImageFeeder, cast_feed
    from stages.lib.qdq.nonfinite import locate_nonfinite
    from stages.lib.segments import runner as segments

    p, t0 = ctx.params, time.time()
    fused = ctx.inputs["fuse"]
    # A vision-only model (CNN backbone, bring-your-own ONNX) has no decoder: calibrate vision.
    graphs = GRAPHS if (fused / "decoder.onnx").is_file() else ("vision",)
    feeder: Any
    cols: dict[str, C.Collector] = {}
    if "decoder" in graphs:
        ckpt, family = resolve_checkpoint(ctx.inputs["checkpoint"])
        feeder = Feeder(ckpt, family, int(p["prompt_len"]), graphio.session(graph_path(fused, "embed")),
                        trust_remote_code=bool(p["trust_remote_code"]))
        dec_path = graph_path(fused, "decoder")
        cols["decoder"] = C.collector(_structure(dec_path))
        dec_inputs = segments.graph_inputs(dec_path)
    else:
        spec = fused / "vision.json"
        feeder = ImageFeeder(json.loads(spec.read_text()) if spec.is_file() else {})
    vision = graphio.load(graph_path(fused, "vision"))
    cols["vision"], vsess = C.make_collector(vision)
    vis_outputs = [o.name for o in vsess.get_outputs()]
    n = int(p["samples"])
    share = 0.3 if "decoder" in graphs else 1.0  # of the progress bar: the decoder's segments take the rest
    seq_lens, dfeeds, names = [], [], []
    kept: dict[str, dict[str, np.ndarray]] = {g: {} for g in graphs}
    for i, s in enumerate(samples(p, resizes_itself=getattr(feeder, "resize", None) is not None)):
        ctx.report(f"calibration sample {i + 1}/{n} ({s.name}): vision", share * i / n)
        try:
            feed, grid = feeder.vision(s)
            vout = graphio.run(vsess, cast_feed(vsess, feed), cols["vision"].names)
            cols["vision"].update(vout)
            if i < KEEP_FEEDS:
                kept["vision"].update({f"s{i}.{k}": v for k, v in feed.items()})
            if "decoder" not in graphs:
                continue
            vis = {k: np.asarray(vout[k], np.float32) for k in vis_outputs if k in vout}
            dfeed = feeder.decoder(s, grid, vis, dec_inputs)
        except C.NonFiniteActivation as e:
            first = locate_nonfinite(vision, cast_feed(vsess, feed))
            raise StageError(f"calibration sample {s.name}: {e} in vision.onnx" + (f"; {first}" if first else "")) from None
        except ValueError as e:  # processor / host-side shape errors name the sample
            raise StageError(f"calibration sample {s.name}: {str(e).splitlines()[0]}") from None
        seq_lens.append(int(dfeed["inputs_embeds"].shape[1]))
        if i < KEEP_FEEDS:
            kept["decoder"].update({f"s{i}.{k}": v for k, v in dfeed.items()})
        dfeeds.append(cast_feed(dec_inputs, dfeed))
        names.append(s.name)
    del vsess, vision  # before the decoder's segments: one graph's weights at a time
    if "decoder" in graphs:
        _decoder(ctx, dec_path, cols["decoder"], dfeeds, names, share)
    metrics: dict[str, Any] = {"samples": n, "source": p["source"], "method": p["method"],
                               "decoder_seq_lens": sorted(set(seq_lens))}
    for g in graphs:
        col = cols[g]
        ranges = {"graph": g, "method": p["method"], "percentile": p["percentile"], "samples": col.samples,
                  "source": p["source"], "order": col.names, "tensors": col.ranges(p["method"], p["percentile"])}
        (ctx.out / f"ranges_{g}.json").write_text(json.dumps(ranges, indent=1))
        np.savez_compressed(ctx.out / f"ranges_{g}.npz", **col.arrays())  # type: ignore[arg-type]
        np.savez(ctx.out / f"feeds_{g}.npz", **kept[g])  # type: ignore[arg-type]
        metrics[f"{g}_tensors"] = len(ranges["tensors"])
    metrics["seconds"] = round(time.time() - t0, 2)
    return StageResult(metrics=metrics)


def _structure(path: Path) -> Any:
    """The graph with its value types but without its external weights: all the collector reads
    (``graphio.load`` would read the weights of a graph under the proto limit)."""
    import onnx
    import onnx_ir as ir

    proto = onnx.load(str(path), load_external_data=False)
    try:
        proto = onnx.shape_inference.infer_shapes(proto, data_prop=True)
    except Exception:  # noqa: BLE001 - unknown ops: the collector then takes untyped values too
        pass
    return ir.from_proto(proto)


def _decoder(ctx: StageContext, path: Path, col: Any, feeds: list[dict[str, np.ndarray]], names: list[str],
             share: float) -> None:
    """Every sample through the decoder segment-major; `col` takes each segment's tensors."""
    from stages.lib.qdq import calibrators as C
    from stages.lib.qdq.nonfinite import locate_nonfinite
    from stages.lib.segments import runner as segments
    from stages.lib.segments.plan import Segment

    def collect(seg: Segment, i: int, outs: dict[str, np.ndarray]) -> None:
        try:
            col.update(outs, count=seg.index == 0)
        except C.NonFiniteActivation as e:
            first = locate_nonfinite(path, feeds[i])
            raise StageError(f"calibration sample {names[i]}: {e} in decoder.onnx"
                             + (f"; {first}" if first else "")) from None

    def progress(k: int, total: int) -> None:
        ctx.report(f"decoder segment {k + 1}/{total} ({len(feeds)} samples)", share + (1 - share) * k / total)

    try:
        segments.run_segmented(path, feeds, collect, expose=col.names, progress=progress)
    except ValueError as e:  # a stale cut list, an input the graph reads that nobody feeds
        raise StageError(f"decoder.onnx cannot run segment by segment: {str(e).splitlines()[0]}") from None


STAGE = Stage(
    name="calibrate",
    resources=node_resources("calibrate"),
    # 4: kept decoder feeds in the graph's own dtypes (one prefill_feeds builds them); 5: with
    # input_ids (the vision search's decoder objective), per-channel maxima chan_amax (SmoothQuant);
    # 6: the present.* KV outputs' ranges (a quantized cache's scales, qdq.kv_cache)
    version="6",
    run=_run,
    params=_params,
    deps=("fuse", "checkpoint"),
    # ranges_decoder.json/.npz too when the model has a decoder (a CNN/BYO vision model has none)
    outputs=("ranges_vision.json", "ranges_vision.npz"),
    toolchain=("onnx", "onnxruntime", "numpy", "transformers", "pillow"),
    external=checkpoint_reads(*ALL_ROLES, plus=_external),
    description="activation ranges of the fused graphs on the calibration set (streaming histograms)",
)
