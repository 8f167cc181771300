"""One quantization recipe applied to one graph: plan the sites, then insert them."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from stages.lib.qdq.placement import Placement, plan
from stages.lib.qdq.rules import rules_for

if TYPE_CHECKING:
    import onnx
    import onnx_ir as ir


@dataclass
class Calib:
    """What calibration measured for one graph (read from ranges_<graph>.json + .npz)."""

    amax: dict[str, float] = field(default_factory=dict)  # int8-grid clip per tensor
    amax_fp8: dict[str, float] = field(default_factory=dict)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    chan_ms: dict[str, np.ndarray] = field(default_factory=dict)  # E[x_k^2] per input channel

    @classmethod
    def from_ranges(cls, ranges: Mapping[str, Any], arrays: Mapping[str, np.ndarray] | None = None) -> Calib:
        t = ranges["tensors"]
        c = cls(
            amax={n: float(r["amax"]) for n, r in t.items()},
            amax_fp8={n: float(r.get("amax_fp8", r["amax"])) for n, r in t.items()},
            shapes={n: tuple(r["shape"]) for n, r in t.items()},
        )
        for i, n in enumerate(ranges.get("order", [])):
            if arrays is not None and f"chan_ms_{i}" in arrays:
                c.chan_ms[n] = np.asarray(arrays[f"chan_ms_{i}"])
        return c

    @classmethod
    def load(cls, json_path: Path) -> Calib:
        ranges = json.loads(json_path.read_text())
        npz = json_path.with_suffix(".npz")
        arrays = dict(np.load(npz)) if npz.is_file() else None
        return cls.from_ranges(ranges, arrays)


@dataclass(frozen=True)
class Recipe:
    mode: str  # int8 | fp8 | int4-weight
    keep: tuple[str, ...] = ()  # keep_high_precision globs
    attention: str = "none"  # "none" | "fp8-mha"
    int4_block: int = 128
    awq: bool = True


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
        amax = calib.amax_fp8 if recipe.mode == "fp8" else calib.amax
        stats = insert.apply(model, pl, amax).as_dict()
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
