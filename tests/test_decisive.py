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
    assert margins(ref) == pytest.approx([2.0, 0.01, 5.0])
    assert decisive(margins(ref), noise=0.1).tolist() == [True, False, True]
    assert decisive(margins(ref), noise=0.0).tolist() == [True, True, True]


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
    ref = rng.normal(size=(1, 40, 30)) * 3
    flipped = ref.copy()
    lead = margins(ref).reshape(40)
    order = np.argsort(-lead)
    for p in order[:8]:  # flip the 8 most confident positions of 40 (20 %): cosine stays high
        i, j = np.argsort(-flipped[0, p])[:2]
        flipped[0, p, i], flipped[0, p, j] = flipped[0, p, j], flipped[0, p, i]
    objective = TokenObjective(lambda outs: [o["logits"] for o in outs], [ref], noise=0.0, target=0.92)
    ev = Evaluator([{}], [{"logits": ref}], ["logits"], tokens=objective, budget=0.992)
    assert ev.cosine([{"logits": flipped}]) > 0.95
    assert ev.score([{"logits": ref}]) == pytest.approx(1.0)
    low = ev.score([{"logits": flipped}])
    assert ev.last_agreement == pytest.approx(0.8) and low < 0.992
    assert low == pytest.approx(1 - (1 - 0.8) * (1 - 0.992) / (1 - 0.92))
    assert token_target({"top1": 0.9}) == pytest.approx(0.92) and token_target({"top1": None}) is None
