"""SmoothQuant for INT8 W8A8: activation outliers migrated into the weights, chosen per group.

Why: INT8 activations here are per-tensor symmetric (what TensorRT fuses), so the scale of a
matmul input is set by its largest channel. Trained LLMs have a few input channels of the
q/k/v and gate/up inputs 10-100x larger than the rest (LLM.int8, SmoothQuant): the per-tensor
step is then so coarse that the other channels round to a handful of levels, or to zero.
Weights are per output channel, so they absorb a per-input-channel scale at little cost.

For an activation X = norm(h) * gamma (+ beta) read only by INT8 matmuls that quantize it,
channel j is divided by s_j = stat_j^alpha / max|W_j|^(1 - alpha), stat_j = max|X_j| (Xiao et
al. 2023) or rms(X_j): folded into gamma (and beta), so the float graph is unchanged, and
W' = diag(s) W on every consumer (``streamed_weights.lazy_const`` rows, as ``awq`` does for
INT4). Smoothing is not free (it coarsens the weights' per-channel steps, and equalized channel
maxima all sit at the edge of the range), so each group takes the option, no smoothing or
(stat, alpha) on a grid, that minimizes an estimate of its INT8 output error on the
calibration statistics (``estimate``); the Q/DQ scale of X' is then max_j amax_j / s_j.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from stages.lib.qdq.awq import S_RANGE, k_chunks, scale_holder, scaled_rows
from stages.lib.qdq.graphio import const_array, const_shape, const_tensor
from stages.lib.qdq.insert import new_const
from stages.lib.qdq.placement import Placement, Site, is_const
from stages.lib.qdq.streamed_weights import Rows, lazy_const, rows_of

if TYPE_CHECKING:
    import onnx_ir as ir

    from stages.lib.qdq.calib import Calib

__all__ = ["ALPHAS", "STATS", "Candidate", "SmoothStats", "apply", "candidates", "estimate", "smoothing_scales"]

ALPHAS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
# the channel statistics s is made of: SmoothQuant's max |x_j|, and the rms (AWQ's statistic),
# which a few hundred rows estimate far more stably than an extreme
STATS = ("max", "rms")
QMAX = 127.0  # INT8 symmetric, weights and activations
# Output columns whose rounding error the estimate computes (evenly spaced; each column's
# step is exact, the row sums are scaled up): a 7B model's gate/up have 18944.
COLUMNS = 1024


@dataclass
class SmoothStats:
    # activation -> {"choice" ("none" | "max@0.5" ...), "stat", "alpha" (None: not smoothed),
    # "err_before", "err_after" (estimated, none / chosen), "errors" (per option), "amax"
    # [before, after], "consumers", "weights" (smoothed weight name -> source weight name)}
    groups: dict[str, dict[str, Any]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # activation -> why it was not considered

    def as_dict(self) -> dict[str, Any]:
        return {"groups": self.groups, "skipped": self.skipped}


@dataclass
class _View:
    """One consumer of the group: its node, weight site, weight rows and layout."""

    node: ir.Node
    site: Site
    rows: Rows
    transposed: bool  # stored [N, K] (Gemm transB): K is axis 1


def smoothing_scales(stat: np.ndarray, w_amax: np.ndarray, alpha: float) -> np.ndarray:
    """s_j = stat_j^alpha / wmax_j^(1-alpha), centred on its geometric mean (a common factor
    changes neither per-tensor nor per-channel INT8 error) and clamped to S_RANGE (fp16)."""
    a = np.maximum(stat.astype(np.float64), 1e-6 * max(float(stat.max()), 1e-30))
    w = np.maximum(w_amax.astype(np.float64), 1e-6 * max(float(w_amax.max()), 1e-30))
    s = a**alpha / w ** (1.0 - alpha)
    s /= np.exp(np.log(s).mean())
    return np.clip(s, *S_RANGE).astype(np.float32)


@dataclass(frozen=True)
class Candidate:
    """One option for a group: no smoothing, or s from a channel statistic at one alpha."""

    stat: str | None = None  # None | "max" (SmoothQuant: max |x_j|) | "rms" (sqrt E[x_j^2])
    alpha: float = 0.0

    @property
    def label(self) -> str:
        return "none" if self.stat is None else f"{self.stat}@{self.alpha:g}"

    def scales(self, chan_amax: np.ndarray, ms: np.ndarray, w_amax: np.ndarray) -> np.ndarray:
        if self.stat is None:
            return np.ones(ms.shape[0], np.float32)
        return smoothing_scales(chan_amax if self.stat == "max" else np.sqrt(ms), w_amax, self.alpha)


def candidates(alphas: Sequence[float] = ALPHAS, stats: Sequence[str] = STATS) -> list[Candidate]:
    return [Candidate()] + [Candidate(st, float(a)) for st in stats for a in alphas]


def estimate(views: Sequence[tuple[Rows, bool]], ms: np.ndarray, chan_amax: np.ndarray, amax: float,
             options: Sequence[Candidate], halves: np.ndarray | None = None) -> tuple[list[float], list[np.ndarray]]:
    """Estimated relative INT8 output error of the group for each option, and its scales.

    Per consumer, Y = X W with X [rows, K] and W [K, N]; quantized, Y~ = Q(X') Q(W') with
    X' = X / s, W' = diag(s) W. To first order the error is dX' W' + X' dW' (dX' dW' is second
    order). Both terms are summed over the N outputs and averaged over rows, taking channels
    as uncorrelated (the rounding noise is; the cross terms of X' dW' average out over the
    random signs of dW', as AWQ assumes):
      activation: per-tensor step d = T / 127; rounding x'_j gives noise of variance d^2/12
        when x'_j spans many steps, but never more than E[x'_j^2] (a channel smaller than half
        a step rounds to zero and loses just itself). Through W' that is
        sum_j min(d^2/12, ms_j / s_j^2) * s_j^2 * ||W_j||^2.
      weight: the rounding error dW'_jn is computed exactly (per output channel step
        max_j |W'_jn| / 127), weighted by E[x'_j^2]: sum_j ms_j / s_j^2 * ||dW'_j||^2.
    Each consumer's sum is divided by its output energy E||Y||^2 ~ sum_j ms_j ||W_j||^2
    (invariant under smoothing), so q/k/v count alike; the group's error is the mean over its
    consumers (about 2 (1 - cosine) per output).
    T is the range unseen data needs, not the calibration's own: scales fitted to per-channel
    maxima equalize them, so every channel sits at the edge of the range, and with a few
    hundred calibration rows those maxima are noisy (measured: a group without outliers then
    looked better smoothed and clipped on held-out data). With ``halves`` (per-channel max over
    the even and the odd calibration samples) the scales are fitted on one half and T is the
    range the other half needs, max_j amax_j(other) / s_j(one), averaged both ways (rms-made
    scales use all samples: a mean moves little between halves); no smoothing
    takes the smaller of that and ``amax``, the calibrated clip its Q/DQ gets (a percentile
    clip's error is not modelled, which only favours leaving a group as it is). Without
    halves, T = max_j amax_j / s_j (no smoothing: ``amax``).
    Each weight is read three times, a chunk of rows at a time: its row statistics (which
    the scales need), then on COLUMNS of its output columns its column maxima per option and
    its rounding errors."""
    k = ms.shape[0]
    ms64 = ms.astype(np.float64)
    w_amax, w_sq = np.zeros(k), [np.zeros(k) for _ in views]
    for i, v in enumerate(views):
        for r0, r1, kn in k_chunks(v, 1):
            a = np.abs(kn.astype(np.float32))
            w_amax[r0:r1] = np.maximum(w_amax[r0:r1], a.max(axis=1))
            w_sq[i][r0:r1] = (a.astype(np.float64) ** 2).sum(axis=1)
    scales = [c.scales(chan_amax, ms, w_amax) for c in options]
    halves = halves if halves is not None and halves.shape == (2, k) and halves.max(axis=1).min() > 0 else None
    steps = []
    for c, s in zip(options, scales, strict=True):
        if halves is None:
            t = amax if c.stat is None else float((chan_amax / s).max())
        else:
            fit = [c.scales(half, ms, w_amax) for half in halves]
            t = 0.5 * sum(float((halves[1 - h] / fit[h]).max()) for h in (0, 1))
            t = min(t, amax) if c.stat is None else t
        steps.append(t / QMAX)
    errors = np.zeros(len(scales))
    for i, v in enumerate(views):
        n = v[0].shape[0 if v[1] else 1]
        cols = np.unique(np.linspace(0, n - 1, min(n, COLUMNS)).astype(np.int64))
        col_max = [np.zeros(cols.size, np.float32) for _ in scales]
        for r0, r1, kn in k_chunks(v, 1):
            w32 = kn[:, cols].astype(np.float32)
            for o, s in enumerate(scales):
                col_max[o] = np.maximum(col_max[o], np.abs(w32 * s[r0:r1, None]).max(axis=0))
        w_err = [np.zeros(k) for _ in scales]
        for r0, r1, kn in k_chunks(v, 1):
            w32 = kn[:, cols].astype(np.float32)
            for o, s in enumerate(scales):
                step = np.maximum(col_max[o] / QMAX, 1e-30)
                ws = w32 * s[r0:r1, None]
                dq = np.clip(np.rint(ws / step), -QMAX - 1, QMAX) * step
                w_err[o][r0:r1] = ((ws - dq).astype(np.float64) ** 2).sum(axis=1) * (n / cols.size)
        energy = max(float((ms64 * w_sq[i]).sum()), 1e-30)
        for o, s in enumerate(scales):
            s64 = s.astype(np.float64)
            act = (np.minimum(steps[o] ** 2 / 12.0 * s64**2, ms64) * w_sq[i]).sum()
            wgt = (ms64 / s64**2 * w_err[o]).sum()
            errors[o] += (act + wgt) / energy / len(views)
    return [float(e) for e in errors], scales


def _const_1d(v: ir.Value | None, k: int) -> bool:
    return v is not None and is_const(v) and const_shape(v) == (k,)


def _holders(x: ir.Value, k: int) -> list[tuple[ir.Node, int]] | None:
    """The (node, input slot) of every constant per-channel factor that x is linear in: gamma
    (awq's cases: Mul, RMSNormalization), and for a LayerNorm its beta too. Dividing each by s
    gives x / s exactly."""
    p = x.producer()
    if p is None:
        return None
    if p.op_type == "LayerNormalization" and _const_1d(p.inputs[1], k):
        has_beta = len(p.inputs) > 2 and p.inputs[2] is not None
        if has_beta and not _const_1d(p.inputs[2], k):
            return None
        return [(p, 1), (p, 2)] if has_beta else [(p, 1)]
    if p.op_type == "Add":  # norm(h) * gamma + beta in primitives
        slots = [i for i in (0, 1) if _const_1d(p.inputs[i], k)]
        inner = p.inputs[1 - slots[0]] if len(slots) == 1 else None
        if inner is None or len(inner.uses()) != 1 or inner.producer() is None:
            return None
        held = _holders(inner, k) if inner.producer().op_type == "Mul" else None  # type: ignore[union-attr]
        return None if held is None else [*held, (p, slots[0])]
    held1 = scale_holder(x)
    return [held1] if held1 is not None and _const_1d(held1[0].inputs[held1[1]], k) else None


def _group(x: ir.Value | None, placement: Placement, k: int) -> tuple[list[tuple[ir.Node, int]], list[_View]] | None:
    """(factors to divide, consumers) when x is smoothable: every reader an INT8 MatMul/Gemm
    whose input 0 (x) and weight are both quantized, x's Q/DQ its own (no shared Concat scale)."""
    if x is None or x.is_graph_output():
        return None
    holders = _holders(x, k)
    consumers = [u.node for u in x.uses()]
    weight_sites = {u[0]: s for s in placement.sites if s.kind == "weight" for u in s.uses}
    act = placement.site(x.name or "", "activation")
    if holders is None or not consumers or act is None or act.group is not None or act.fixed_amax is not None:
        return None
    if set(act.uses) != {(c.name, 0) for c in consumers} or len(act.uses) != len(consumers):
        return None  # a reader whose x is not quantized (or reads x elsewhere) would see x / s
    views = []
    for c in consumers:
        site = weight_sites.get(c.name or "")
        gemm_ta = c.op_type == "Gemm" and "transA" in c.attributes and c.attributes["transA"].value
        t = const_tensor(c.inputs[1]) if len(c.inputs) > 1 else None
        if site is None or c.op_type not in ("MatMul", "Gemm") or gemm_ta or c.inputs[0] is not x or t is None:
            return None
        rows, transposed = rows_of(t), site.axis == 0  # site.axis is the output channel axis
        if len(rows.shape) != 2 or rows.shape[1 if transposed else 0] != k:
            return None
        views.append(_View(c, site, rows, transposed))
    return holders, views


def _own_site(placement: Placement, site: Site, node: str) -> Site:
    """The weight site of ``node`` alone: a weight shared with another matmul keeps its source
    tensor there (only this consumer reads the smoothed copy)."""
    if len(site.uses) == 1:
        return site
    site.uses.remove((node, 1))
    mine = replace(site, uses=[(node, 1)])
    placement.sites.append(mine)
    return mine


def apply(model: ir.Model, placement: Placement, calib: Calib,
          options: Sequence[Candidate] | None = None) -> tuple[Calib, SmoothStats]:
    """Fold the chosen scales into the norms and weights of ``model`` (in place, before
    ``insert.apply``; the placement's weight sites are pointed at the smoothed weights). Returns
    the calibration with the smoothed activations' statistics (amax = max_j amax_j / s_j, as
    calibrated) and the per-group choices. ``options``: default ``candidates()``."""
    options = candidates() if options is None else list(options)
    assert options and options[0].stat is None, "the first option is no smoothing"
    graph = model.graph
    out = replace(calib, amax=dict(calib.amax), amax_fp8=dict(calib.amax_fp8), chan_ms=dict(calib.chan_ms),
                  chan_amax=dict(calib.chan_amax), chan_amax_halves=dict(calib.chan_amax_halves))
    stats = SmoothStats()
    made = {v.name: v for n in graph for v in n.outputs if v.name}  # no node is added here
    for x_name, ms in calib.chan_ms.items():
        found = _group(made.get(x_name), placement, ms.shape[0])
        if found is None:
            continue
        if x_name not in calib.chan_amax or x_name not in calib.amax:
            stats.skipped[x_name] = "no per-channel max |x| in the calibration (recalibrate)"
            continue
        holders, views = found
        chan_amax = calib.chan_amax[x_name]
        errors, scales = estimate([(v.rows, v.transposed) for v in views], ms, chan_amax, calib.amax[x_name],
                                  options, calib.chan_amax_halves.get(x_name))
        best = int(np.argmin(errors))
        g: dict[str, Any] = {
            "choice": options[best].label, "stat": options[best].stat,
            "alpha": options[best].alpha if best else None,
            "err_before": round(errors[0], 8), "err_after": round(errors[best], 8),
            "errors": {c.label: round(e, 8) for c, e in zip(options, errors, strict=True)},
            "amax": [calib.amax[x_name], calib.amax[x_name]], "consumers": [v.node.name for v in views], "weights": {},
        }
        stats.groups[x_name] = g
        if not best:
            continue
        s = scales[best]
        for node, slot in holders:
            v = node.inputs[slot]
            arr = const_array(v)  # type: ignore[arg-type]
            assert arr is not None
            node.replace_input_with(slot, new_const(graph, f"{v.name}_smooth", (arr.astype(np.float32) / s).astype(arr.dtype)))  # type: ignore[union-attr]
        for view in views:
            src = view.node.inputs[1]
            nv = lazy_const(graph, f"{src.name}_smooth", view.rows.map(scaled_rows(s, view.transposed, view.rows.dtype), view.rows.dtype))  # type: ignore[union-attr]
            view.node.replace_input_with(1, nv)
            site = _own_site(placement, view.site, view.node.name or "")
            g["weights"][nv.name] = site.tensor
            site.tensor = nv.name or ""
        smoothed = float((chan_amax / s).max())
        g["amax"][1] = smoothed
        out.amax[x_name] = out.amax_fp8[x_name] = smoothed
        out.chan_ms[x_name] = (ms / s.astype(np.float64) ** 2).astype(np.float32)
        out.chan_amax[x_name] = (chan_amax / s).astype(np.float32)
        if x_name in calib.chan_amax_halves:
            out.chan_amax_halves[x_name] = (calib.chan_amax_halves[x_name] / s).astype(np.float32)
    return out, stats
