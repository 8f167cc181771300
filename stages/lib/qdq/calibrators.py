"""Streaming range collection by running the graph itself in onnxruntime.

The graph's intermediate tensors that quantization may need (inputs of compute ops, Add and
Concat inputs, Softmax outputs) are exposed as extra outputs; each sample updates running
per-tensor statistics and is dropped, so memory does not grow with the number of samples.
A graph too big for one session runs segment by segment (``stages.lib.segments.runner``): each segment
exposes the tensors it makes, and the collector takes them per segment (``update(count=False)``
after the first), each tensor still seeing the samples in order, so the statistics are the same.
Histograms of |x| keep a fixed bin count and widen by merging whole bins when a later sample
exceeds the range, so the merge is exact. Ranges: max, percentile, entropy (TensorRT's KL
search on 128 levels) and MSE (on the int8 or E4M3 grid).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import onnx_ir as ir

NBINS = 2048
CALIBRATED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul", "Add", "Concat")
# activation-aware int4 needs E[x_k^2] per input channel; SmoothQuant (int8) also max |x_k|
CHANNEL_STAT_OPS = ("MatMul", "Gemm")


class NonFiniteActivation(ValueError):
    """A calibration sample produced NaN/Inf in a named tensor."""


@dataclass
class TensorStats:
    hist: np.ndarray = field(default_factory=lambda: np.zeros(NBINS, np.int64))
    width: float = 0.0  # bin width of |x|; 0 until the first non-zero sample
    lo: float = math.inf
    hi: float = -math.inf
    shape: tuple[int, ...] = ()
    chan_sq: np.ndarray | None = None  # sum over rows of x_k^2
    # max over rows of |x_k|, [2, K]: over the even- and the odd-numbered updates (samples), so
    # a statistic fitted on one half can be checked on the other (smoothquant)
    chan_max: np.ndarray | None = None
    chan_updates: int = 0
    rows: int = 0

    @property
    def amax(self) -> float:
        return max(abs(self.lo), abs(self.hi)) if self.hi >= self.lo else 0.0

    def update(self, x: np.ndarray, channels: bool = False) -> None:
        a = np.abs(x.astype(np.float32, copy=False)).ravel()
        self.shape = tuple(x.shape)
        if x.size == 0:
            return
        self.lo, self.hi = min(self.lo, float(x.min())), max(self.hi, float(x.max()))
        m = float(a.max())
        if m > 0:
            if self.width == 0.0:
                self.width = m / NBINS
            elif m > self.width * NBINS:
                k = math.ceil(m / (self.width * NBINS))  # merge k old bins into one new bin
                h = np.concatenate([self.hist, np.zeros((-NBINS) % k, np.int64)]).reshape(-1, k).sum(1)
                self.hist = np.concatenate([h, np.zeros(NBINS - h.size, np.int64)])
                self.width *= k
            idx = np.minimum((a / self.width).astype(np.int64), NBINS - 1)
            self.hist += np.bincount(idx, minlength=NBINS)
        else:
            self.hist[0] += a.size
        if channels and x.ndim >= 2:
            flat = x.reshape(-1, x.shape[-1]).astype(np.float64)
            sq = (flat * flat).sum(0)
            self.chan_sq = sq if self.chan_sq is None else self.chan_sq + sq
            if self.chan_max is None:
                self.chan_max = np.zeros((2, flat.shape[1]))
            half = self.chan_max[self.chan_updates % 2]
            np.maximum(half, np.abs(flat).max(0), out=half)
            self.chan_updates += 1
            self.rows += flat.shape[0]


def percentile_amax(st: TensorStats, pct: float) -> float:
    total = st.hist.sum()
    if total == 0 or st.width == 0:
        return st.amax
    i = int(np.searchsorted(np.cumsum(st.hist), total * pct / 100.0))
    return min(st.amax, (i + 1) * st.width)


def entropy_amax(st: TensorStats, levels: int = 128, stride: int = 16) -> float:
    """TensorRT's entropy calibration: the clip minimizing KL(P || Q) over `levels` bins."""
    hist = st.hist.astype(np.float64)
    if st.width == 0 or hist.sum() == 0:
        return st.amax
    last = int(np.nonzero(hist)[0][-1]) + 1
    best, best_i = math.inf, last
    for i in list(range(levels, last, stride)) + [last]:
        if i < levels:
            continue
        p = hist[:i].copy()
        p[i - 1] += hist[i:].sum()  # outliers clipped into the last bin
        chunks = np.array_split(hist[:i], levels)
        q = np.concatenate([
            np.where(c > 0, c.sum() / max(np.count_nonzero(c), 1), 0.0) for c in chunks
        ])
        p /= p.sum()
        qs = q.sum()
        if qs == 0:
            continue
        q /= qs
        mask = p > 0
        kl = float(np.sum(p[mask] * np.log(p[mask] / np.maximum(q[mask], 1e-12))))
        if kl < best:
            best, best_i = kl, i
    return min(st.amax, best_i * st.width) if last >= levels else st.amax


def fake_quant(x: np.ndarray, scale: np.ndarray | float, grid: str) -> np.ndarray:
    """Round |x| (>= 0) to the int8 or E4M3 grid at `scale`."""
    import ml_dtypes

    if grid == "int8":
        return np.clip(np.rint(x / scale), 0, 127) * scale
    return np.clip(x / scale, 0, 448).astype(ml_dtypes.float8_e4m3fn).astype(np.float64) * scale


def mse_amax(st: TensorStats, grid: str = "int8", candidates: int = 64) -> float:
    """The clip minimizing the histogram-weighted squared quantization error."""
    if st.width == 0 or st.hist.sum() == 0:
        return st.amax
    centers = (np.arange(NBINS) + 0.5) * st.width
    nz = st.hist > 0
    c, n = centers[nz], st.hist[nz].astype(np.float64)
    qmax = 127.0 if grid == "int8" else 448.0
    amaxes = np.linspace(0.2, 1.0, candidates) * st.amax
    errs = [float(np.sum(n * (c - fake_quant(c, a / qmax, grid)) ** 2)) for a in amaxes]
    return float(amaxes[int(np.argmin(errs))])


def choose(st: TensorStats, method: str, pct: float = 99.99, grid: str = "int8") -> float:
    if method == "max":
        return st.amax
    if method == "percentile":
        return percentile_amax(st, pct)
    if method == "entropy":
        return entropy_amax(st)
    if method == "mse":
        return mse_amax(st, grid)
    raise ValueError(f"unknown calibration method {method!r}")


def calibration_tensors(graph: ir.Graph) -> tuple[list[str], set[str]]:
    """Tensors to observe (in topological order) and those needing per-channel stats."""
    import onnx_ir as ir

    from stages.lib.qdq.kv_cache import PRESENT
    from stages.lib.qdq.placement import is_const

    names: list[str] = []
    chans: set[str] = set()
    floats = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, None)
    for node in graph:
        wanted: list[ir.Value] = []
        if node.op_type in CALIBRATED_OPS:
            wanted += [v for v in node.inputs if v is not None and not is_const(v)]
        if node.op_type == "Softmax":
            wanted.append(node.outputs[0])
        for v in wanted:
            if v.dtype in floats and v.name and v.name not in names:
                names.append(v.name)
        if node.op_type in CHANNEL_STAT_OPS and len(node.inputs) > 1 and is_const(node.inputs[1]):
            if node.inputs[0] is not None and node.inputs[0].name:
                chans.add(node.inputs[0].name)
    # the decoder's KV cache outputs: their ranges are a quantized cache's scales (qdq.kv_cache)
    names += [v.name for v in graph.outputs if v.name and v.name.startswith(PRESENT) and v.name not in names]
    return names, chans


def expose(model: ir.Model, names: Iterable[str]) -> Any:
    """A proto of `model` with `names` added as graph outputs (the original is untouched)."""
    import onnx

    from stages.lib.qdq.graphio import to_proto

    proto = to_proto(model)
    have = {o.name for o in proto.graph.output}
    typed = {vi.name: vi for vi in list(proto.graph.value_info) + list(proto.graph.input)}
    for n in names:
        if n in have:
            continue
        vi = typed.get(n)
        proto.graph.output.append(vi if vi is not None else onnx.helper.make_empty_tensor_value_info(n))
    return proto


@dataclass
class Collector:
    """Running statistics for every observed tensor of one graph."""

    names: list[str]
    channels: set[str] = field(default_factory=set)
    producers: dict[str, str] = field(default_factory=dict)
    stats: dict[str, TensorStats] = field(default_factory=dict)
    samples: int = 0

    def update(self, outputs: Mapping[str, np.ndarray], count: bool = True) -> None:
        """Add one sample's values of (some of) the tensors. ``count=False``: more values of a
        sample already counted (a later segment of a segmented run)."""
        # Check every tensor first, in graph order, so the error names the first bad layer.
        for n in self.names:
            x = outputs.get(n)
            if x is not None and np.issubdtype(x.dtype, np.floating) and not np.isfinite(x).all():
                where = f" (produced by node {self.producers[n]})" if n in self.producers else ""
                raise NonFiniteActivation(f"NaN/Inf activation in tensor {n!r}{where}")
        for n in self.names:
            x = outputs.get(n)
            if x is None or not np.issubdtype(x.dtype, np.floating):
                continue
            self.stats.setdefault(n, TensorStats()).update(x, channels=n in self.channels)
        self.samples += int(count)

    def ranges(self, method: str, pct: float = 99.99) -> dict[str, dict[str, Any]]:
        out = {}
        # in `names` order: a segmented run fills `stats` segment by segment
        for n, st in ((n, self.stats[n]) for n in self.names if n in self.stats):
            fp8 = choose(st, method if method != "entropy" else "max", pct, grid="fp8")
            out[n] = {
                "amax": choose(st, method, pct, grid="int8"),
                # E4M3 is log-spaced: KL over uniform bins does not model it, so fp8 uses max there.
                "amax_fp8": fp8,
                "max_abs": st.amax, "min": st.lo, "max": st.hi,
                "shape": list(st.shape), "producer": self.producers.get(n, ""),
            }
        return out

    def arrays(self) -> dict[str, np.ndarray]:
        """Histograms and channel statistics for the `.npz` artifact, keyed by index."""
        out: dict[str, np.ndarray] = {}
        for i, n in enumerate(self.names):
            st = self.stats.get(n)
            if st is None:
                continue
            out[f"hist_{i}"] = st.hist
            out[f"width_{i}"] = np.array(st.width)
            if st.chan_sq is not None:
                out[f"chan_ms_{i}"] = (st.chan_sq / max(st.rows, 1)).astype(np.float32)
            if st.chan_max is not None:
                out[f"chan_amax_{i}"] = st.chan_max.max(0).astype(np.float32)
                if st.chan_updates >= 2:
                    out[f"chan_amax_halves_{i}"] = st.chan_max.astype(np.float32)
        return out


def make_collector(model: ir.Model) -> tuple[Collector, Any]:
    """A collector for `model` and the ORT session that exposes its tensors."""
    from stages.lib.qdq.graphio import session

    col = collector(model)
    return col, session(expose(model, col.names))


def collector(model: ir.Model) -> Collector:
    """A collector for `model`'s calibrated tensors and graph outputs, in graph order."""
    from stages.lib.qdq.placement import ensure_names

    ensure_names(model.graph)
    names, chans = calibration_tensors(model.graph)
    producers = {o.name: n.name or "" for n in model.graph for o in n.outputs if o.name}
    # Order by producer so a NaN is reported at the first layer that made it.
    order = {v.name: -1 for v in model.graph.inputs}
    order.update({o.name: i for i, n in enumerate(model.graph) for o in n.outputs})
    names = sorted((n for n in names if n), key=lambda n: order.get(n, -1))
    outs = [o.name for o in model.graph.outputs if o.name]
    return Collector(names=names + [o for o in outs if o not in names], channels=chans, producers=producers)
