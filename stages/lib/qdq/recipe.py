"""One quantization recipe applied to one graph: plan the sites, then insert them."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stages.lib.qdq.calib import Calib
from stages.lib.qdq.placement import Placement, plan
from stages.lib.qdq.rules import rules_for

if TYPE_CHECKING:
    import onnx
    import onnx_ir as ir


@dataclass(frozen=True)
class Recipe:
    mode: str  # int8 | fp8 | int4-weight
    keep: tuple[str, ...] = ()  # keep_high_precision globs
    attention: str = "none"  # "none" | "fp8-mha"
    int4_block: int = 128
    awq: bool = True
    # int8: SmoothQuant outlier migration into the norms, per group where it lowers the
    # estimated INT8 error (stages.lib.qdq.smoothquant); needs chan_amax in the calibration
    smooth: bool = False

    def with_method(self, method: str, on: bool) -> Recipe:
        """This recipe with a proxy method (``awq`` or ``smooth``) on or off."""
        from dataclasses import replace

        if method not in ("awq", "smooth"):
            raise ValueError(f"no proxy method {method!r} (awq, smooth)")
        return replace(self, awq=on) if method == "awq" else replace(self, smooth=on)


@dataclass
class Built:
    model: ir.Model
    placement: Placement
    stats: dict[str, Any]


def build(source: onnx.ModelProto | Path | str, recipe: Recipe, calib: Calib,
          keep_nodes: Mapping[str, str] | None = None) -> Built:
    """Quantize a fresh model made from ``source`` (never modified): a ModelProto, or a path read
    as ``graphio.load_proto(path, in_file=True)`` (types inferred, external weights left in
    their file). Building from a proto whose weights are external costs the structure only:
    each weight is read once for its scales, its codes are computed when the model is saved."""
    import onnx_ir as ir

    from stages.lib.qdq import insert, int4

    if isinstance(source, (str, Path)):
        from stages.lib.qdq.graphio import load_proto

        source = load_proto(source, in_file=True)
    model = ir.from_proto(source)
    rules = rules_for(recipe.mode)
    pl = plan(model.graph, recipe.mode, calib.shapes, recipe.keep, recipe.attention, keep_nodes)
    if rules.weights == "block":
        chan_ms, scaled = dict(calib.chan_ms), {}
        if recipe.awq:  # AWQ scales folded into the norms first; the clip search then sees x / s
            from stages.lib.qdq import awq

            chan_ms, st_awq = awq.apply(model, pl, calib.chan_ms, recipe.int4_block)
            scaled = st_awq.groups
        st = int4.apply(model, pl, chan_ms, recipe.int4_block, recipe.awq)
        stats = {**st.as_dict(), "awq_scales": scaled}
        pl.skipped.extend(st.skipped)
    else:
        smoothed = None
        if recipe.smooth and recipe.mode == "int8" and rules.weights == "per-channel" and rules.activations:
            from stages.lib.qdq import smoothquant

            calib, st_sq = smoothquant.apply(model, pl, calib)  # before Q/DQ: the scales see x / s
            smoothed = st_sq.as_dict()
        amax = calib.amax_fp8 if recipe.mode == "fp8" else calib.amax
        stats = insert.apply(model, pl, amax).as_dict()
        if smoothed is not None:
            stats["smoothquant"] = smoothed
    return Built(model, pl, stats)


def weight_share(graph: ir.Graph, placement: Placement, stats: Mapping[str, Any]) -> dict[str, Any]:
    """Share of matmul/conv weights (by parameter count) that ended up quantized (from the
    declared shapes: no weight is read)."""
    import math

    from stages.lib.qdq.graphio import const_shape
    from stages.lib.qdq.placement import is_const

    total = quant = 0
    qnames = {s.tensor for s in placement.sites if s.kind == "weight"}
    if "blocks" in stats:  # int4: only the weights actually converted (AWQ-scaled ones renamed)
        qnames = {n.removesuffix("_awq") for n in stats["blocks"]}
    # int8 SmoothQuant: the sites hold the smoothed copies, named after their source weights
    renamed = {new: old for g in stats.get("smoothquant", {}).get("groups", {}).values() for new, old in g["weights"].items()}
    qnames = {renamed.get(n, n) for n in qnames}
    seen: set[str] = set()
    for node in graph:
        if node.op_type not in ("Conv", "ConvTranspose", "Gemm", "MatMul") or len(node.inputs) < 2:
            continue
        w = node.inputs[1]
        if w is None or not is_const(w) or w.name in seen:
            continue
        seen.add(w.name or "")
        shape = const_shape(w)
        size = math.prod(shape) if shape is not None else 0
        total += size
        if w.name in qnames:
            quant += size
    return {"weights_total": total, "weights_quantized": quant, "share": (quant / total) if total else 0.0}
