"""Token gates that grade what the model says: decisive positions, KL, and the search objective.

A position counts only where the reference's lead (top-1 minus top-2 logit) exceeds twice the
unquantized export's logit error: near-ties of a random model cannot fail a build by chance, a
confident token that flips always does.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from stages.lib.parity.metrics import (
    MIN_PROB_LEAD,
    Agreement,
    decisive,
    decisive_top1,
    export_noise,
    gate_checks,
    kl_divergence,
    margins,
)
from stages.lib.qdq.objectives import TokenObjective
from stages.lib.qdq.sensitivity import Evaluator, token_target


def test_margins_and_decisive_positions() -> None:
    ref = np.array([[[3.0, 1.0, 0.0], [1.0, 0.99, 0.0], [0.0, 0.0, 5.0]]])
    leads = margins(ref)
    assert leads.shape == (3, 2) and leads[:, 0] == pytest.approx([2.0, 0.01, 5.0])
    p = np.exp(ref[0]) / np.exp(ref[0]).sum(-1, keepdims=True)
    assert leads[:, 1] == pytest.approx(np.sort(p, -1)[:, -1] - np.sort(p, -1)[:, -2])
    assert decisive(leads, noise=0.1).tolist() == [True, False, True]
    assert decisive(leads[:, 0], noise=0.001).tolist() == [True, True, True]  # logit leads alone: the noise rule


def test_a_flat_softmax_counts_nothing_whatever_its_logit_lead() -> None:
    """A random model over a real vocabulary: logit leads far above an FP16 export's noise, but
    the reference itself is indifferent (probability leads ~1e-5), so no position is decisive."""
    rng = np.random.default_rng(0)
    flat = rng.normal(size=(4, 151936)) * 0.9
    leads = margins(flat)
    assert (leads[:, 0] > 2 * 0.007).all() and (leads[:, 1] < MIN_PROB_LEAD).all()
    assert not decisive(leads, noise=0.007).any()
    peaked = flat.copy()
    peaked[:, 7] += 20.0  # a trained model's confident token
    assert decisive(margins(peaked), noise=0.007).all()


def test_a_near_tie_cannot_fail_and_a_confident_flip_always_counts() -> None:
    ref = np.array([[[3.0, 1.0, 0.0], [1.0, 0.99, 0.0], [0.0, 0.0, 5.0]]])
    near_tie_flipped = ref.copy()
    near_tie_flipped[0, 1] = [0.99, 1.0, 0.0]
    a = decisive_top1(near_tie_flipped, ref, noise=0.1)
    assert (a.agreed, a.decisive, a.positions, a.agreement) == (2, 2, 3, 1.0)
    confident_flipped = ref.copy()
    confident_flipped[0, 0] = [1.0, 3.0, 0.0]
    assert decisive_top1(confident_flipped, ref, noise=0.1).agreement == 0.5
    # nothing decisive: no figure, so no gate can read one
    assert decisive_top1(ref, ref, noise=10.0).agreement is None
    assert (Agreement(1, 2, 3) + Agreement(2, 2, 2)).agreement == 0.75


def test_a_text_is_graded_up_to_its_first_decisive_change() -> None:
    from stages.lib.parity.metrics import free_running_agreement, until_first_change

    ref = np.array([5, 6, 7, 8])
    leads = np.array([[1.0, 0.5], [0.001, 0.001], [1.0, 0.5], [1.0, 0.5]])  # position 1: a near-tie
    first = until_first_change(np.array([9, 6, 7, 8]), ref, leads, noise=0.01)
    assert (first.agreed, first.decisive, first.agreement) == (0, 1, 0.0)  # a changed first token: 0
    late = until_first_change(np.array([5, 9, 7, 0]), ref, leads, noise=0.01)  # the tie flip is noise
    assert (late.agreed, late.decisive) == (2, 3)
    free = free_running_agreement(np.array([5, 9, 7, 0]), ref, leads, noise=0.01)  # texts part at the tie
    assert (free.agreed, free.decisive) == (1, 1)


def test_kl_is_zero_on_itself_and_grows_with_the_change() -> None:
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(5, 50))
    assert np.allclose(kl_divergence(ref, ref), 0.0, atol=1e-12)
    assert np.allclose(kl_divergence(ref + 3.0, ref), 0.0, atol=1e-12)  # a shift is the same distribution
    small, big = kl_divergence(ref + 0.1 * rng.normal(size=ref.shape), ref), kl_divergence(2 * ref, ref)
    assert (small > 0).all() and small.mean() < big.mean()
    checks = gate_checks("vision_effect.int8.pytorch decoder", {"kl": float(big.mean())}, {"kl": 0.05})
    assert [c.passed for c in checks] == [False] and checks[0].op == "<="


def test_export_noise_reads_the_export_parity(tmp_path: Path) -> None:
    assert export_noise(tmp_path) == 0.0  # no decoder export: every lead counts
    (tmp_path / "decoder.json").write_text('{"parity": {"max_abs": 0.0173}}')
    assert export_noise(tmp_path) == pytest.approx(0.0173)


def test_the_search_score_meets_the_budget_only_when_the_tokens_do() -> None:
    """The Evaluator folds the decisive agreement into one score: at the target agreement it
    scores exactly the budget, below it less, whatever the cosine."""
    rng = np.random.default_rng(1)
    ref = rng.normal(size=(1, 40, 30))
    ref[0, np.arange(40), rng.integers(0, 30, 40)] += 4.0  # every position decisive
    flipped = ref.copy()
    lead = margins(ref)[:, 0]
    assert decisive(margins(ref), noise=0.0).all()
    order = np.argsort(-lead)
    for p in order[:8]:  # flip the 8 most confident positions of 40 (20 %): cosine stays high
        i, j = np.argsort(-flipped[0, p])[:2]
        flipped[0, p, i], flipped[0, p, j] = flipped[0, p, j], flipped[0, p, i]
    objective = TokenObjective(lambda outs: [o["logits"] for o in outs], [ref], noise=0.0, target=0.92)
    ev = Evaluator([{}], [{"logits": ref}], ["logits"], tokens=objective, budget=0.992)
    cos = ev.cosine([{"logits": flipped}])
    assert ev.score([{"logits": ref}]) == pytest.approx(1.0)
    low = ev.score([{"logits": flipped}])
    mapped = 1 - (1 - 0.8) * (1 - 0.992) / (1 - 0.92)  # 0.98: the agreement misses its target
    assert ev.last_agreement == pytest.approx(0.8) and low == pytest.approx(min(cos, mapped)) and low < 0.992
    no_tokens = Evaluator([{}], [{"logits": ref}], ["logits"], budget=0.992)
    assert no_tokens.score([{"logits": flipped}]) == pytest.approx(cos)  # without the objective: the cosine
    assert token_target({"top1": 0.85}) == pytest.approx(0.95) and token_target({"top1": None}) is None
    assert token_target({"top1": 0.7, "tokens": 0.85}) == pytest.approx(0.95)


def test_no_objective_where_nothing_is_decisive() -> None:
    """A flat random model's reference has no decisive position: the search drops the objective
    instead of paying a run per candidate for an agreement that is always None."""
    from stages.lib.qdq.objectives import decisive_or_none, decoder_objective

    rng = np.random.default_rng(2)
    flat = rng.normal(size=(1, 6, 151936)) * 0.9
    assert decisive_or_none(decoder_objective([{"logits": flat}], noise=0.007, target=0.95)) is None
    peaked = flat.copy()
    peaked[0, :, 3] += 20.0
    assert decisive_or_none(decoder_objective([{"logits": peaked}], noise=0.007, target=0.95)) is not None
