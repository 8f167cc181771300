"""AWQ scale search for INT4 weights: per-input-channel scales folded into the preceding norm.

For an activation X = norm(h) * gamma read only by INT4-quantized matmuls (q/k/v, gate/up),
scaling channel k of every weight by s_k and gamma_k by 1/s_k leaves the float graph unchanged
but gives salient channels (large E[x_k^2]) finer INT4 steps. s = rms(x)^alpha, normalized;
alpha is searched on a grid to minimize the activation-weighted INT4 error
sum_k E[x_k^2] / s_k^2 * ||dW'_k||^2 summed over the consumers (AWQ, Lin et al. 2023).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from stages.lib.qdq.graphio import const_array
from stages.lib.qdq.int4 import block_for, quantize_blocks
from stages.lib.qdq.placement import Placement, is_const

if TYPE_CHECKING:
    import onnx_ir as ir

ALPHAS = tuple(np.round(np.linspace(0.0, 1.0, 11), 2))
S_RANGE = (1 / 64, 64.0)  # keeps gamma / s and W * s inside fp16


@dataclass
class AwqStats:
    groups: dict[str, dict[str, Any]] = field(default_factory=dict)  # activation -> alpha, gain, consumers


def _block_error(w_kn: np.ndarray, block: int, dt: Any) -> np.ndarray:
    """Per-row squared INT4 error sum_n dW_kn^2 of plain max-scaled blocks."""
    codes, scales, _ = quantize_blocks(w_kn, block, None, dt)
    deq = codes.astype(np.float32) * np.repeat(scales.astype(np.float32), block, axis=0)
    return ((w_kn.astype(np.float32) - deq) ** 2).sum(axis=1)


def search(ws: list[np.ndarray], ms: np.ndarray, block: int, dt: Any) -> tuple[np.ndarray, float, float]:
    """(scales s [K], alpha, relative loss reduction vs. alpha = 0) for weights [K, N] sharing X."""
    rms = np.sqrt(np.maximum(ms.astype(np.float64), 1e-12))
    best: tuple[float, np.ndarray, float] | None = None
    base = None
    for a in ALPHAS:
        s = rms**a
        s = np.clip(s / np.sqrt(s.max() * s.min()), *S_RANGE).astype(np.float32)
        loss = float(sum((ms / s.astype(np.float64) ** 2 * _block_error(w * s[:, None], block, dt)).sum() for w in ws))
        base = loss if base is None else base
        if best is None or loss < best[0]:
            best = (loss, s, float(a))
    assert best is not None and base is not None
    return best[1], best[2], (1.0 - best[0] / base) if base > 0 else 0.0


def _scale_holder(x: ir.Value) -> tuple[ir.Node, int] | None:
    """(node, input slot) of the constant per-channel scale that produces x (norm's gamma).

    A gamma shared with other nodes (exporters deduplicate equal initializers) is fine: the
    scaled copy is a new initializer wired to this node only."""
    p = x.producer()
    if p is None:
        return None
    if p.op_type == "Mul":
        for i, v in enumerate(p.inputs[:2]):
            arr = const_array(v) if v is not None else None
            if arr is not None and arr.ndim == 1 and v is not None:
                return p, i
    if p.op_type in ("RMSNormalization", "SimplifiedLayerNormalization") and len(p.inputs) > 1:
        v = p.inputs[1]
        if v is not None and is_const(v):
            return p, 1
    return None


def apply(model: ir.Model, placement: Placement, chan_ms: Mapping[str, np.ndarray], block: int) -> tuple[dict[str, np.ndarray], AwqStats]:
    """Fold searched scales into gamma and the weights (in place); returns the channel
    statistics of the scaled activations (E[(x/s)^2]) for the INT4 clip search."""
    graph = model.graph
    weight_sites = {u[0]: s for s in placement.sites if s.kind == "weight" for u in s.uses}
    out = dict(chan_ms)
    stats = AwqStats()
    for x_name, ms in chan_ms.items():
        x = next((v for n in graph for v in n.outputs if v.name == x_name), None)
        if x is None or x.is_graph_output():
            continue
        holder = _scale_holder(x)
        consumers = [u.node for u in x.uses()]
        # every reader must be an INT4 matmul reading x as input 0: others would see x / s
        if holder is None or not consumers or any(c.name not in weight_sites or c.inputs[0] is not x for c in consumers):
            continue
        ws, views = [], []
        for c in consumers:
            site = weight_sites[c.name or ""]
            w = const_array(c.inputs[1]) if c.inputs[1] is not None else None
            if w is None or w.ndim != 2:
                break
            kn = w if (site.axis or 0) == 0 else w.T
            if kn.shape[0] != ms.shape[0] or block_for(kn.shape[0], block) is None:
                break
            ws.append(kn.astype(np.float32))
            views.append((c, w.dtype, (site.axis or 0) != 0))
        else:
            dt = views[0][1] if views[0][1] in (np.float16, np.float32) else np.float32
            s, alpha, gain = search(ws, ms, block_for(ws[0].shape[0], block) or block, dt)
            node, slot = holder
            gv = node.inputs[slot]
            gamma = const_array(gv)  # type: ignore[arg-type]
            assert gamma is not None
            new_g = (gamma.astype(np.float32) / s).astype(gamma.dtype)
            node.replace_input_with(slot, _init(graph, f"{gv.name}_awq", new_g))  # type: ignore[union-attr]
            for (c, wdt, transposed), kn in zip(views, ws, strict=True):
                scaled = kn * s[:, None]
                arr = (scaled.T if transposed else scaled).astype(wdt)
                nv = _init(graph, f"{c.inputs[1].name}_awq", arr)  # type: ignore[union-attr]
                c.replace_input_with(1, nv)
                weight_sites[c.name or ""].tensor = nv.name or ""
            out[x_name] = (ms / s.astype(np.float64) ** 2).astype(np.float32)
            stats.groups[x_name] = {"alpha": alpha, "gain": round(gain, 4), "consumers": [c.name for c, _, _ in views]}
    return out, stats


def _init(graph: ir.Graph, name: str, arr: np.ndarray) -> ir.Value:
    from stages.lib.qdq.insert import _const

    return _const(graph, name, arr)
