"""INT4 weight-only quantization: block-wise, DQ-only weights with an activation-aware clip.

Each MatMul/Gemm weight is stored as packed INT4 behind `DequantizeLinear(axis, block_size)`
(opset 21), scales in the graph's float dtype, no zero point (symmetric: what TensorRT's
weight-only INT4 gemm takes). Activations stay in high precision. The clip of each block is
searched to minimize the output error the block causes, weighted by the calibrated second
moment E[x_k^2] of the input channel it multiplies (AWQ-clip, as in Model-Optimizer's awq_clip):
a large-activation channel's weight error costs more than a near-silent one's.

Each weight is read once, in chunks of whole blocks (``streamed_weights.Rows``), for its block scales;
the codes are computed again from the weight when the model is saved (``streamed_weights.lazy_const``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from stages.lib.qdq.graphio import const_tensor, set_opset
from stages.lib.qdq.insert import (
    drop_unused_initializers,
    new_const,
    quantize_array,
    replace_weight_with_dq,
    value_of,
    zero_point,
)
from stages.lib.qdq.placement import Placement, Site
from stages.lib.qdq.rules import rules_for
from stages.lib.qdq.streamed_weights import Rows, lazy_const, rows_of

if TYPE_CHECKING:
    import onnx_ir as ir

CLIP_RATIOS = tuple(np.round(np.arange(1.0, 0.49, -0.05), 2))
MIN_BLOCK = 32  # TensorRT's INT4 block sizes are 32/64/128


@dataclass
class Int4Stats:
    weight_dq: int = 0
    blocks: dict[str, int] = field(default_factory=dict)  # weight -> block size used
    skipped: list[dict[str, str]] = field(default_factory=list)
    awq: dict[str, float] = field(default_factory=dict)  # weight -> weighted error reduction vs max clip

    def as_dict(self) -> dict[str, Any]:
        return {"qdq_pairs": 0, "weight_dq": self.weight_dq, "blocks": self.blocks, "awq_gain": self.awq}


def block_for(k: int, wanted: int) -> int | None:
    """The configured block if it divides K, else the largest smaller power of two >= 32."""
    b = wanted
    while b >= MIN_BLOCK:
        if k % b == 0:
            return b
        b //= 2
    return None


def quantize_blocks(w_kn: np.ndarray, block: int, ms: np.ndarray | None, dt: Any) -> tuple[np.ndarray, np.ndarray, float]:
    """Quantize W[K, N] in K-blocks; returns (int4 codes [K,N], scales [K/B, N], error gain).

    With `ms` (E[x_k^2], length K) the clip per (block, column) minimizes
    sum_k ms_k (w_kn - dq(w_kn))^2; without it, plain max scaling.
    """
    best_scale, best, base = clip_search(w_kn, block, ms, dt)
    codes = block_codes(w_kn, best_scale, block)
    return codes, best_scale.astype(dt), _gain(best, base)


def clip_search(w_kn: np.ndarray, block: int, ms: np.ndarray | None, dt: Any) -> tuple[np.ndarray, Any, float]:
    """The best clip per (block, column) of W[K, N]: (scales [K/B, N] as float32, the weighted
    error they leave, the error of plain max scaling). Blocks are independent: any chunk of
    whole blocks gives its own rows of the same scales."""
    k, n = w_kn.shape
    w = w_kn.astype(np.float32).reshape(k // block, block, n)
    amax = np.abs(w).max(axis=1)  # [nb, N]
    weight = (np.ones(k, np.float32) if ms is None else ms.astype(np.float32)).reshape(k // block, block, 1)
    best_err = np.full(amax.shape, np.inf, np.float32)
    best_scale = np.zeros_like(amax)
    base_err = None
    for r in CLIP_RATIOS if ms is not None else (1.0,):
        # Scales are rounded to the graph dtype first so the search sees what DQ will compute.
        s = np.maximum(amax * r / 7.0, np.finfo(dt).smallest_subnormal).astype(dt).astype(np.float32)
        q = np.clip(np.rint(w / s[:, None, :]), -8, 7)
        err = (weight * (w - q * s[:, None, :]) ** 2).sum(axis=1)
        if base_err is None:
            base_err = err
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_scale = np.where(better, s, best_scale)
    assert base_err is not None
    return best_scale, best_err.sum(), float(base_err.sum())


def block_codes(w_kn: np.ndarray, scale: np.ndarray, block: int) -> np.ndarray:
    """INT4 codes of W[K, N] for block scales [K/B, N] (the DQ dtype's values, any float type)."""
    k, n = w_kn.shape
    w = w_kn.astype(np.float32).reshape(k // block, block, n)
    return quantize_array(w, scale.astype(np.float32)[:, None, :], "int4").reshape(k, n)


def _gain(best: Any, base: float) -> float:
    return float(1.0 - best / max(base, 1e-30))


def block_scales(w: Rows, axis: int, block: int, ms: np.ndarray | None, dt: Any) -> tuple[np.ndarray, float]:
    """Block scales of a 2-D weight in its own layout ([K/B, N] for axis 0, [N, K/B] for axis 1)
    and the error gain, from one pass over its rows (chunks of whole blocks along K)."""
    parts, best, base = [], None, 0.0
    for r0, r1, c in w.chunks(block if axis == 0 else 1):
        if axis == 0:
            sc, b, e = clip_search(c, block, None if ms is None else ms[r0:r1], dt)
        else:
            sc, b, e = clip_search(c.T, block, ms, dt)
            sc = sc.T
        parts.append(sc)
        best, base = (b if best is None else best + b), base + e
    return np.concatenate(parts, axis=0).astype(dt), _gain(best, base)


def insert_int4_weight(graph: ir.Graph, site: Site, block: int, ms: np.ndarray | None, stats: Int4Stats) -> bool:
    import onnx_ir as ir

    t = const_tensor(value_of(graph, site.tensor))
    if t is None or len(t.shape) != 2:
        stats.skipped.append({"node": site.uses[0][0], "rule": "int4", "why": "weight is not a 2-D constant"})
        return False
    w = rows_of(t)
    axis = site.axis if site.axis is not None else 0
    dt = w.dtype if w.dtype in (np.float16, np.float32) else np.float32
    k = w.shape[0] if axis == 0 else w.shape[1]
    b = block_for(k, block)
    if b is None:
        why = f"K={k} is not a multiple of an INT4 block (>= {MIN_BLOCK})"
        stats.skipped.append({"node": site.uses[0][0], "rule": "int4-block", "why": why})
        return False
    if ms is not None and ms.shape != (k,):
        ms = None
    scales, gain = block_scales(w, axis, b, ms, dt)

    def codes(r0: int, r1: int, c: np.ndarray) -> np.ndarray:
        if axis == 0:
            return block_codes(c, scales[r0 // b:r1 // b], b)
        return block_codes(c.T, scales[r0:r1].T, b).T

    # chunks of whole blocks along K hold an even count of codes: whole bytes, two codes a byte
    qv = lazy_const(graph, f"{site.tensor}_int4", w.map(codes, zero_point("int4", ()).dtype), b if axis == 0 else 1)
    sv = new_const(graph, f"{site.tensor}_scale", scales)
    attrs = [ir.AttrInt64("axis", axis), ir.AttrInt64("block_size", b)]
    replace_weight_with_dq(graph, site, [qv, sv], attrs, w.shape, dt)
    stats.blocks[site.tensor] = b
    if ms is not None:
        stats.awq[site.tensor] = round(gain, 4)
    return True


def activation_of(nodes: Mapping[str, ir.Node], site: Site) -> str | None:
    """The activation tensor multiplying this weight (input 0 of its consumer)."""
    x = nodes[site.uses[0][0]].inputs[0]
    return x.name if x is not None else None


def apply(model: ir.Model, placement: Placement, chan_ms: Mapping[str, np.ndarray], block: int = 128,
          awq: bool = True) -> Int4Stats:
    """Quantize every weight site of an int4-weight placement in place (opset raised to 21)."""
    rules = rules_for(placement.mode)
    if rules.weights != "block":
        raise ValueError(f"int4.apply needs the int4-weight mode, got {placement.mode}")
    set_opset(model, rules.opset_min)
    model.ir_version = max(model.ir_version or 0, 10)  # INT4 tensors need IR version 10
    stats = Int4Stats()
    nodes = {n.name or "": n for n in model.graph}  # sites add DQ nodes only: consumers stay
    for site in placement.sites:
        if site.kind != "weight":
            continue
        act = activation_of(nodes, site)
        ms = chan_ms.get(act) if (awq and act) else None
        if insert_int4_weight(model.graph, site, block, ms, stats):
            stats.weight_dq += 1
    drop_unused_initializers(model.graph)
    model.graph.sort()
    return stats
