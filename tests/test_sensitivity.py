"""Mixed precision: keep patterns, ranking by parity loss, fallback until the budget is met."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir

from stages.lib.qdq import calibrators as C
from stages.lib.qdq import sensitivity as S
from stages.lib.qdq.graphio import run, session
from stages.lib.qdq.recipe import Calib, Recipe
from tests import qdq_graphs as G


def test_group_of():
    assert S.group_of("/model/layers.3/self_attn/q_proj/MatMul") == "layers.3/self_attn"
    assert S.group_of("/visual/blocks.0/mlp/fc1/MatMul") == "blocks.0/mlp"
    assert S.group_of("attn/q_proj/MatMul") == "attn/q_proj"
    assert S.group_of("conv1") == "conv1"


def _setup():
    proto = onnx.shape_inference.infer_shapes(G.mlp_block())
    col, sess = C.make_collector(ir.from_proto(proto))
    for s in range(3):
        col.update(run(sess, G.random_feed(proto, s), col.names))
    calib = Calib.from_ranges({"tensors": col.ranges("max"), "order": col.names}, col.arrays())
    feeds = [G.random_feed(proto, 50 + i) for i in range(2)]
    ref = session(proto)
    refs = [run(ref, f) for f in feeds]
    return proto, calib, S.Evaluator(feeds, refs, ["y"])


def test_no_budget_quantizes_everything():
    proto, calib, ev = _setup()
    built, rep = S.run(proto, Recipe("int8"), calib, None, ev)
    assert rep.kept == [] and rep.met and built.stats["weight_dq"] == 2


def test_falls_back_the_worst_group_until_budget():
    proto, calib, ev = _setup()
    # sabotage the down projection's input range: its group becomes by far the worst
    calib.amax["g"] = calib.amax["g"] * 40
    built, rep = S.run(proto, Recipe("int8"), calib, 0.9995, ev)
    assert rep.ranking[0]["group"] == "mlp/down" and rep.ranking[0]["loss"] > rep.ranking[-1]["loss"]
    assert rep.kept and rep.kept[0]["group"] == "mlp/down" and "rank 1" in rep.kept[0]["why"]
    assert rep.cosine_final >= rep.cosine_full and rep.met
    assert "mlp/down/MatMul" not in built.placement.quantized_nodes()
    assert "mlp/up/MatMul" in built.placement.quantized_nodes() or rep.cosine_final >= 0.9995


def test_unreachable_budget_reports_not_met():
    proto, calib, ev = _setup()
    calib.amax["g"] *= 40
    calib.amax["h"] *= 40
    built, rep = S.run(proto, Recipe("int8"), calib, 1.0 + 0.0, ev)
    assert len(rep.kept) == len(rep.ranking) and np.isfinite(rep.cosine_final)


def test_fallback_walk_finds_the_fewest_groups_in_log_steps():
    """Doubling then bisecting: the same k a one-group-at-a-time walk finds, in O(log n) scores."""
    for need in range(0, 41):
        calls: list[int] = []

        def score(k: int, calls: list[int] = calls, need: int = need) -> float:
            calls.append(k)
            return 0.999 if k >= need else 0.9 + k * 1e-3

        k, tried = S.fallback_walk(40, 0.999, 0.999 if need == 0 else 0.9, score)
        assert k == need and tried[k] >= 0.999 and (k == 0 or tried[k - 1] < 0.999)  # k - 1 was scored: fewest
        assert len(calls) == len(set(calls)) <= 2 * 6 + 1  # log2(40) ~ 5.3, each k scored once
    k, tried = S.fallback_walk(5, 0.9999, 0.9, lambda k: 0.99)  # unreachable: everything kept
    assert k == 5 and tried[5] == 0.99
