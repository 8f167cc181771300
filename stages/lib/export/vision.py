"""The export half of the ``export_vision`` stage: the encoder to ``vision.onnx`` and its io spec.
The parity half (onnxruntime vs PyTorch, the gates, ``vision.json``) is ``stages.lib.parity.vision``.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Any

from pipeline.stage import StageContext, StageError
from pipeline.worker import peak_rss_mb
from stages.lib.dtypes import CONFIG_DTYPES, torch_dtype


def _round(side: int, factor: int) -> int:
    return max(factor, round(side / factor) * factor)


def patches_for(spec: Any, hw: list[int] | tuple[int, int]) -> int:
    """Patches of one image of this size (sides rounded to the merge factor, as the processor does)."""
    f, p = spec.factor, spec.patch_size
    return (_round(hw[0], f) // p) * (_round(hw[1], f) // p)


def images_at(sizes: list[list[int]], spec: Any, image_proc: Any, seed: int) -> tuple[Any, Any]:
    from stages.lib.hostside import vision as hv

    if image_proc is None:  # no processor in the checkpoint: sizes snapped to the merge factor
        sizes = [[_round(h, spec.factor), _round(w, spec.factor)] for h, w in sizes]
    imgs = [hv.synthetic_image(h, w, seed + i) for i, (h, w) in enumerate(sizes)]
    return hv.preprocess(imgs, spec, image_proc)


def io_spec(spec: Any, family: str, dtype: str, params: dict[str, Any], out_dim: int) -> dict[str, Any]:
    from stages.lib.hostside import vision as hv
    from stages.lib.patches import vision as pv

    shapes = {"pixel_values": ("float32", ["patches", spec.patch_dim]),
              "rotary_cos": ("float32", ["patches", spec.head_dim]),
              "rotary_sin": ("float32", ["patches", spec.head_dim]),
              "attn_segments": ("int64", ["patches"]), "window_segments": ("int64", ["patches"]),
              "pos_interp_index": ("int64", ["patches", 4]), "pos_interp_weight": ("float32", ["patches", 4]),
              "image_features": (CONFIG_DTYPES[dtype], ["tokens", out_dim]),
              "deepstack_features": (CONFIG_DTYPES[dtype], [len(spec.deepstack_layers), "tokens", out_dim])}
    prof = params["profile"]
    n = {"min": patches_for(spec, prof["min_image"]), "opt": patches_for(spec, prof["opt_image"]),
         "max": patches_for(spec, prof["max_image"]) * prof["max_images"]}
    ins = hv.input_names(spec)

    def entry(name: str) -> dict[str, Any]:
        return {"name": name, "dtype": shapes[name][0], "shape": shapes[name][1]}

    return {
        "inputs": [entry(x) for x in ins],
        "outputs": [entry(x) for x in pv.output_names(family)],
        "profile": {**prof, "patches": n, "tokens": {k: v // spec.merge_size**2 for k, v in n.items()},
                    "shapes": {x: {k: [n[k] if d == "patches" else d for d in shapes[x][1]] for k in n} for x in ins}},
        "dtype": dtype,
        "opset": params["opset"],
        "family": family,
        "spec": spec.as_dict(),
        "layout": "patches: processor order (spatial-merge block-major), images concatenated",
    }


# External data above this size. Protobuf caps a single file at 2 GB, but memory decides the
# threshold: serialising a one-file model copies every weight into the proto and then into the
# byte string (measured: peak 4.9x the weights of a 0.56 GB encoder, 1.96x with external data).
EXTERNAL_DATA_BYTES = 256 * 1024**2


def _export(visual: Any, family: str, args: tuple[Any, ...], names: list[str], outs: list[str], onnx_path: Path,
            opset: int, merge_unit: int, weight_bytes: int, stamp: bool) -> tuple[str, str]:
    """torch.export -> ONNX (dynamo), blocks stamped (``vision_stamp``) unless ``stamp`` is off or
    refused; TorchScript as the fallback. Returns (exporter, how the blocks were exported).

    The patch axis is declared ``merge_unit * tokens``: the patch merger reshapes groups of
    ``merge_unit`` patches, and torch.export proves (rather than assumes) that only multiples
    of it are valid, so nothing about the sample's count is baked in.
    """
    import torch

    from stages.lib.export import vision_stamp as vs
    from stages.lib.patches import vision as pv

    external = weight_bytes > EXTERNAL_DATA_BYTES
    kinds = pv.block_kinds(visual, family)
    template = vs.template_blocks(kinds, pv.deepstack_taps(visual, family))
    try:
        prog = None
        how = "trace (every block)"
        if stamp and len(template) < len(kinds):
            try:
                prog = _dynamo(pv.export_module(visual, family, template), args, names, outs, opset, merge_unit)
                n = vs.stamp_blocks(prog.model, kinds, template, lambda name: visual.get_parameter(name.removeprefix("visual.")))
                how = f"stamp (blocks {template} traced, {n} stamped)"
            except StageError as e:  # the template does not stamp: trace every block, say why
                prog, how = None, f"trace (stamping refused: {e})"
        if prog is None:
            prog = _dynamo(pv.export_module(visual, family), args, names, outs, opset, merge_unit)
        prog.save(str(onnx_path), external_data=external)
        _name_dims(onnx_path, names, outs)
        return "dynamo", how
    except Exception as dyn_err:  # noqa: BLE001 - keep the reason, try the legacy exporter
        for f in onnx_path.parent.glob("vision.onnx*"):
            f.unlink()
        axes: dict[str, dict[int, str]] = {n: {0: "patches"} for n in names}
        axes.update({"image_features": {0: "tokens"}, "deepstack_features": {1: "tokens"}})
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", category=DeprecationWarning)
                torch.onnx.export(pv.export_module(visual, family), args, str(onnx_path), input_names=names,
                                  output_names=outs, dynamic_axes={k: v for k, v in axes.items() if k in names + outs},
                                  opset_version=opset, dynamo=False, do_constant_folding=True)
        except Exception as ts_err:  # noqa: BLE001
            raise StageError(f"vision export failed: dynamo: {str(dyn_err).splitlines()[0]}; "
                             f"torchscript: {str(ts_err).splitlines()[0]}") from None
        return "torchscript", "trace (every block)"


def _dynamo(module: Any, args: tuple[Any, ...], names: list[str], outs: list[str], opset: int, merge_unit: int) -> Any:
    """The ONNXProgram of ``module``, optimised by ``fusion.cleanup``."""
    import torch
    from torch.export import Dim

    patches = merge_unit * Dim("tokens", min=1, max=1 << 20)
    head = ({0: patches},) * 4
    shapes = head + ((tuple({0: patches} for _ in names[4:]),) if len(names) > 4 else ())
    ep = torch.export.export(module, args, dynamic_shapes=shapes, strict=False)
    # The optimizer is ours (``fusion.cleanup``: onnxscript's passes less the one rule that
    # cost most and rewrote nothing; the fuse stage runs the same), not torch's optimize=True:
    # that took ~20 of the ~45 s of a 32-block ViT's export. An unoptimized export does not
    # run (torchlib's Conv carries an empty bias that a rewrite rule removes).
    from stages.lib.fusion.cleanup import cleanup

    prog = torch.onnx.export(ep, args, input_names=names, output_names=outs, opset_version=opset,
                             dynamo=True, optimize=False)
    cleanup(prog.model)  # type: ignore[union-attr]
    return prog


def _name_dims(onnx_path: Path, names: list[str], outs: list[str]) -> None:
    """torch.export names the axes after its symbols (``4*s0``); name them ``patches``/``tokens``
    (the names vision.json uses). Only the graph proto is rewritten, never the weights."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    for v in model.graph.input:
        if v.name in names:
            v.type.tensor_type.shape.dim[0].dim_param = "patches"
    for v in model.graph.output:
        dims = v.type.tensor_type.shape.dim
        dims[1 if v.name == "deepstack_features" else 0].dim_param = "tokens"
    onnx.save(model, str(onnx_path))


def export_graph(out: Path, path: Path, family: str, p: dict[str, Any], report: Any = None) -> dict[str, Any]:
    """Load the encoder in the export dtype, export ``out/vision.onnx``; return export facts.

    Only one copy of the encoder's weights is alive (streamed from the shards in the export
    dtype); it is released before this returns, so the caller's parity reference never
    coexists with it.
    """
    import onnx
    import torch

    from stages.lib.checkpoints import local as ck
    from stages.lib.hostside import vision as hv
    from stages.lib.patches import vision as pv

    report = report or (lambda msg, frac=None: None)
    onnx_path = out / "vision.onnx"
    # the image processor alone (no tokenizer files); None without processor files: numpy patchifier
    image_proc = ck.load_image_processor(path, bool(p.get("trust_remote_code", False)), missing_ok=True)
    report("loading the vision encoder", 0.05)
    t0 = time.perf_counter()
    visual = ck.load_vision(path, family, torch_dtype(p["dtype"]), trust_remote_code=bool(p.get("trust_remote_code", False)))
    load_s = time.perf_counter() - t0
    spec = hv.VisionSpec.from_config(family, visual.config, image_proc)
    weight_bytes = sum(t.numel() * t.element_size() for t in visual.state_dict().values())
    islands = pv.keep_fp32(visual, tuple(p["fp32_vision_blocks"])) if p["dtype"] != "fp32" else []
    names, outs = hv.input_names(spec), pv.output_names(family)
    pvals, grid = images_at([p["sample_image"]], spec, image_proc, p["seed"] + 999)
    feeds = hv.vision_inputs(spec, pvals, grid)
    args = tuple(torch.from_numpy(feeds[n]) for n in names)
    report("exporting vision.onnx", 0.2)
    with pv.patch_vision_attention(family), torch.no_grad():
        exporter, how = _export(visual, family, args, names, outs, onnx_path, p["opset"], spec.merge_size**2,
                                weight_bytes, p.get("vision_export", "stamp") == "stamp")
    out_dim = int(visual.merger.mlp[-1].out_features if family != "qwen3_vl" else visual.merger.linear_fc2.out_features)
    del visual, args
    onnx.checker.check_model(str(onnx_path))
    return {"exporter": exporter, "blocks": how, "spec": spec, "image_proc": image_proc, "islands": islands, "grid": grid,
            "out_dim": out_dim, "weight_bytes": weight_bytes, "export_seconds": time.perf_counter() - t0, "load_seconds": load_s,
            "onnx_bytes": sum(f.stat().st_size for f in out.glob("vision.onnx*"))}


# A vision tower with more stored weight bytes than this is exported in a child process: the
# exporter leaves ~1x the weights behind in the process after it returns (measured at Qwen3-VL-8B:
# 1.2 GB of FX-held tensors, 4.66 GB stage peak against 3.35 GB allowed), and only a process
# exit gives that back before the FP32 parity reference loads. Small towers (tests) stay in-process.
CHILD_ABOVE = 512 * 1024**2


def _export_in_child(out: Path, path: Path, family: str, p: dict[str, Any]) -> tuple[dict[str, Any], float]:
    """``export_graph`` in a spawned process (torch not yet imported here, so the child starts
    small); its facts and its own peak RSS in MB."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_export_child, out, path, family, p).result()


def _export_child(out: Path, path: Path, family: str, p: dict[str, Any]) -> tuple[dict[str, Any], float]:
    facts = export_graph(out, path, family, p)
    return facts, peak_rss_mb()


def export(ctx: StageContext, path: Path, family: str) -> dict[str, Any]:
    """``export_graph`` for the stage: in a child process for a big tower; the facts plus the
    export's peak RSS (``export_rss``, bytes, before any parity reference loads) and ``notes``."""
    from stages.lib.checkpoints.streamed_model import stored_bytes

    p = ctx.params
    notes: list[str] = []
    if stored_bytes(path, "model.visual.") > CHILD_ABOVE:
        ctx.report("exporting vision.onnx (in a child process: the exporter's leftovers go with it)", 0.05)
        f, child_mb = _export_in_child(ctx.out, path, family, p)
        notes.append(f"vision exported in a child process (peak {child_mb / 1024:.2f} GB there)")
    else:
        f = export_graph(ctx.out, path, family, p, ctx.report)
    return {**f, "export_rss": round(peak_rss_mb() * 2**20), "notes": notes}  # the finished child's peak included
