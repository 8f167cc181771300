"""AWQ scale search for INT4 weights: per-input-channel scales folded into the preceding norm.

For an activation X = norm(h) * gamma read only by INT4-quantized matmuls (q/k/v, gate/up),
scaling channel k of every weight by s_k and gamma_k by 1/s_k leaves the float graph unchanged
but gives salient channels (large E[x_k^2]) finer INT4 steps. s = rms(x)^alpha, normalized;
alpha is searched on a grid to minimize the activation-weighted INT4 error
sum_k E[x_k^2] / s_k^2 * ||dW'_k||^2 summed over the consumers (AWQ, Lin et al. 2023).

The search reads each consumer once, in chunks of whole INT4 blocks along K (the error of row
k depends on row k alone, so the chunks give the eager search's numbers exactly); the scaled
weights are ``streamed_weights.lazy_const`` rows, computed from the source when read or saved.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from stages.lib.qdq.graphio import const_array, const_shape, const_tensor
from stages.lib.qdq.insert import new_const
from stages.lib.qdq.int4 import block_for, quantize_blocks
from stages.lib.qdq.placement import Placement, is_const
from stages.lib.qdq.streamed_weights import Rows, lazy_const, rows_of

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


def search(ws: Sequence[np.ndarray | tuple[Rows, bool]], ms: np.ndarray, block: int, dt: Any) -> tuple[np.ndarray, float, float]:
    """(scales s [K], alpha, relative loss reduction vs. alpha = 0) for weights [K, N] sharing X
    (arrays, or (rows, transposed) read a chunk at a time)."""
    rms = np.sqrt(np.maximum(ms.astype(np.float64), 1e-12))
    scales = []
    for a in ALPHAS:
        s = rms**a
        scales.append(np.clip(s / np.sqrt(s.max() * s.min()), *S_RANGE).astype(np.float32))
    k = ms.shape[0]
    errs = [[np.empty(k, np.float32) for _ in ws] for _ in ALPHAS]
    for j, w in enumerate(ws):
        for r0, r1, kn in k_chunks(w, block):
            kn32 = kn.astype(np.float32)
            for i, s in enumerate(scales):
                errs[i][j][r0:r1] = _block_error(kn32 * s[r0:r1, None], block, dt)
    best: tuple[float, np.ndarray, float] | None = None
    base = None
    for a, s, err in zip(ALPHAS, scales, errs, strict=True):
        loss = float(sum((ms / s.astype(np.float64) ** 2 * e).sum() for e in err))
        base = loss if base is None else base
        if best is None or loss < best[0]:
            best = (loss, s, float(a))
    assert best is not None and base is not None
    return best[1], best[2], (1.0 - best[0] / base) if base > 0 else 0.0


def k_chunks(w: np.ndarray | tuple[Rows, bool], block: int) -> Iterator[tuple[int, int, np.ndarray]]:
    """Rows r0:r1 of W[K, N] in whole blocks. A transposed weight ([N, K] in its file) is read
    whole: its K rows are columns there."""
    if isinstance(w, np.ndarray):
        yield 0, w.shape[0], w
        return
    rows, transposed = w
    if transposed:
        full = rows.get(0, rows.shape[0]).T
        rows = Rows(full.shape, rows.dtype, lambda r0, r1: full[r0:r1])
    yield from rows.chunks(block)


def scale_holder(x: ir.Value) -> tuple[ir.Node, int] | None:
    """(node, input slot) of the constant per-channel scale that produces x (norm's gamma).

    A gamma shared with other nodes (exporters deduplicate equal initializers) is fine: the
    scaled copy is a new initializer wired to this node only."""
    p = x.producer()
    if p is None:
        return None
    if p.op_type == "Mul":
        for i, v in enumerate(p.inputs[:2]):
            shape = const_shape(v)
            if shape is not None and len(shape) == 1:
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
    made: dict[str, ir.Value] = {}
    for n in graph:  # AWQ adds no nodes: the values stay those of the graph as given
        for v in n.outputs:
            made.setdefault(v.name or "", v)
    for x_name, ms in chan_ms.items():
        x = made.get(x_name)
        if x is None or x.is_graph_output():
            continue
        holder = scale_holder(x)
        consumers = [u.node for u in x.uses()]
        # every reader must be an INT4 matmul reading x as input 0: others would see x / s
        if holder is None or not consumers or any(c.name not in weight_sites or c.inputs[0] is not x for c in consumers):
            continue
        views = []
        for c in consumers:
            site = weight_sites[c.name or ""]
            t = const_tensor(c.inputs[1])
            if t is None or len(t.shape) != 2:
                break
            w, transposed = rows_of(t), (site.axis or 0) != 0
            k = w.shape[1] if transposed else w.shape[0]
            if k != ms.shape[0] or block_for(k, block) is None:
                break
            views.append((c, w, transposed))
        else:
            dt = views[0][1].dtype if views[0][1].dtype in (np.float16, np.float32) else np.float32
            s, alpha, gain = search([(w, tr) for _, w, tr in views], ms, block_for(ms.shape[0], block) or block, dt)
            node, slot = holder
            gv = node.inputs[slot]
            gamma = const_array(gv)  # type: ignore[arg-type]
            assert gamma is not None
            new_g = (gamma.astype(np.float32) / s).astype(gamma.dtype)
            node.replace_input_with(slot, new_const(graph, f"{gv.name}_awq", new_g))  # type: ignore[union-attr]
            for c, w, transposed in views:
                nv = lazy_const(graph, f"{c.inputs[1].name}_awq", w.map(scaled_rows(s, transposed, w.dtype), w.dtype))  # type: ignore[union-attr]
                c.replace_input_with(1, nv)
                weight_sites[c.name or ""].tensor = nv.name or ""
            out[x_name] = (ms / s.astype(np.float64) ** 2).astype(np.float32)
            stats.groups[x_name] = {"alpha": alpha, "gain": round(gain, 4), "consumers": [c.name for c, _, _ in views]}
    return out, stats


def scaled_rows(s: np.ndarray, transposed: bool, dtype: Any) -> Any:
    """Rows of W * s along K (K is axis 1 of a transposed weight), in the weight's dtype."""
    def rows(r0: int, r1: int, w: np.ndarray) -> np.ndarray:
        return (w.astype(np.float32) * (s[None, :] if transposed else s[r0:r1, None])).astype(dtype)

    return rows
