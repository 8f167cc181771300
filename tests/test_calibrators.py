"""Streaming range collection: exact histogram merges, methods, bounded memory, NaN naming."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from stages.lib.qdq import calibrators as C
from stages.lib.qdq.graphio import run
from tests import qdq_graphs as G


def _stats(chunks):
    st = C.TensorStats()
    for c in chunks:
        st.update(c)
    return st


def test_histogram_widening_is_exact():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal(5000), rng.standard_normal(5000) * 7
    st = _stats([a, b])
    assert st.hist.sum() == 10000
    assert st.amax == pytest.approx(max(np.abs(a).max(), np.abs(b).max()))
    # every sample lands in the bin of its |x| at the final width (merges are whole bins)
    ref = np.bincount(np.minimum((np.abs(np.concatenate([a, b])) / st.width).astype(int), C.NBINS - 1),
                      minlength=C.NBINS)
    assert np.abs(ref - st.hist).sum() <= 4  # float rounding at bin edges only


def test_methods_clip_outliers_but_max_does_not():
    rng = np.random.default_rng(1)
    x = np.concatenate([rng.standard_normal(200_000), [60.0]])
    st = _stats(np.array_split(x, 10))
    assert C.choose(st, "max") == pytest.approx(60.0)
    for m in ("percentile", "entropy", "mse"):
        v = C.choose(st, m, pct=99.9)
        assert 2.0 < v < (30.0 if m != "mse" else 45.0), (m, v)
    assert C.mse_amax(st, "fp8") <= 60.0
    with pytest.raises(ValueError):
        C.choose(st, "minmax")


def test_memory_does_not_grow_with_samples():
    st = C.TensorStats()
    st.update(np.ones((4, 8)), channels=True)
    size = st.hist.nbytes + st.chan_sq.nbytes
    for i in range(50):
        st.update(np.full((4, 8), float(i)), channels=True)
    assert st.hist.nbytes + st.chan_sq.nbytes == size and st.rows == 51 * 4


def _model():
    proto = onnx.shape_inference.infer_shapes(G.mlp_block())
    return proto, ir.from_proto(proto)


def test_collector_runs_the_graph_and_matches_numpy():
    proto, m = _model()
    col, sess = C.make_collector(m)
    assert {"x", "h", "g", "y"} <= set(col.names)
    assert "h" in col.channels  # MatMul inputs get channel statistics for int4
    feeds = [G.random_feed(proto, s) for s in range(3)]
    for f in feeds:
        col.update(run(sess, f, col.names))
    xs = np.concatenate([f["x"] for f in feeds])
    r = col.ranges("max")
    assert r["x"]["amax"] == pytest.approx(np.abs(xs).max())
    assert r["h"]["shape"] == [1, 32, 64] and r["h"]["producer"] == "ln"
    ms = col.stats["x"].chan_sq
    assert ms is None or ms.shape == (64,)
    arrs = col.arrays()
    assert any(k.startswith("chan_ms_") for k in arrs)


def test_nan_names_the_tensor_and_layer():
    proto, m = _model()
    col, sess = C.make_collector(m)
    f = G.random_feed(proto)
    f["x"][0, 0, 0] = np.nan
    with pytest.raises(C.NonFiniteActivation, match=r"'x'"):
        col.update(run(sess, f, col.names))
    outs = run(sess, G.random_feed(proto), col.names)
    outs["g"] = outs["g"] * np.inf
    with pytest.raises(C.NonFiniteActivation, match=r"'g'.*mlp/act"):
        col.update(outs)
