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
    assert rep.score_final >= rep.score_full and rep.met
    assert "mlp/down/MatMul" not in built.placement.quantized_nodes()
    assert "mlp/up/MatMul" in built.placement.quantized_nodes() or rep.score_final >= 0.9995


def test_unreachable_budget_reports_not_met():
    proto, calib, ev = _setup()
    calib.amax["g"] *= 40
    calib.amax["h"] *= 40
    built, rep = S.run(proto, Recipe("int8"), calib, 1.0 + 0.0, ev)
    assert len(rep.kept) == len(rep.ranking) and np.isfinite(rep.score_final)


def test_fallback_walk_is_exact_in_one_candidate_where_losses_add_up():
    """The model's own case: each group's harm adds up, scaled. One whole candidate is scored,
    and k is the fewest that meets the budget."""
    rng = np.random.default_rng(0)
    losses = sorted(rng.exponential(1e-3, 60), reverse=True)

    def truth(k: int) -> float:
        return 1.0 - 0.37 * sum(losses[k:])  # blocks' losses scale to the output's by 0.37

    for budget in (truth(0) + 1e-6, truth(1) - 1e-12, truth(7) + 1e-9, truth(30) - 1e-12, 1.0 - 1e-12):
        calls: list[int] = []
        k, tried = S.fallback_walk(losses, budget, truth(0), lambda k, calls=calls: (calls.append(k), truth(k))[1])
        fewest = next(i for i in range(61) if truth(i) >= budget)
        assert k == fewest and (tried[k] >= budget or k == 60)
        assert len(calls) <= (0 if k == 0 else 2)  # the prediction, and at most its neighbour below


def test_fallback_walk_lands_near_the_fewest_where_losses_do_not_add_up():
    """As measured at 8 B (FP8 decoder, 73 groups): the loss falls slower than the ranking's
    losses add up, so the first, proportional guess keeps too many (23 where 10 do). The
    interpolation between measured candidates comes back down, within WALK_MOST candidates."""
    rng = np.random.default_rng(1)
    losses = sorted(rng.exponential(2e-4, 73), reverse=True)
    tail = [sum(losses[k:]) for k in range(74)]

    def truth(k: int) -> float:
        return 1.0 - 0.045 * (tail[k] / tail[0]) ** 0.6

    fewest = next(k for k in range(74) if truth(k) >= 0.992)
    k, tried = S.fallback_walk(losses, 0.992, truth(0), truth)
    assert tried[k] >= 0.992 and fewest <= k <= fewest + 2 and len(tried) - 1 <= S.WALK_MOST


def test_fallback_walk_meets_the_budget_in_few_candidates_where_the_model_is_wrong():
    """Noisy, non-additive truth (the last groups matter more than their ranking says): the walk
    corrects on each measurement, scores at most WALK_MOST candidates, and what it returns meets
    the budget, or keeps everything when nothing measured did."""
    losses = [1e-3] * 40
    for need in (1, 5, 17, 33, 40):
        calls: list[int] = []

        def score(k: int, calls: list[int] = calls, need: int = need) -> float:
            calls.append(k)
            return 0.999 if k >= need else 0.99 + k * 1e-5

        k, tried = S.fallback_walk(losses, 0.999, 0.99, score)
        assert tried[k] >= 0.999 and len(set(calls)) == len(calls) <= S.WALK_MOST + 1
        assert k >= need
    k, tried = S.fallback_walk([1e-3] * 5, 0.9999, 0.9, lambda k: 0.99)  # unreachable: everything kept
    assert k == 5 and tried[5] == 0.99
