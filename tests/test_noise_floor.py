"""Held-out images graded at their own noise floor (``parity.noise_floor``): the gate holds on a
well-resolved image, relaxes to twice the floor on a coarse one, and still fails a build far
worse than that floor; the search scores on the same scale."""

from __future__ import annotations

import numpy as np
import pytest

from stages.lib.parity.metrics import Parity, compare, gate_checks
from stages.lib.parity.noise_floor import floor_of, graded, on_gate_scale, perturbed, thresholds

GATE = {"cosine": 0.99, "norm_ratio": 0.25}


def _p(cos: float, norm: float = 0.0) -> Parity:
    return Parity(cosine=cos, rel_l2=0.0, max_abs=0.0, norm_ratio=norm, finite=True)


def test_the_perturbation_is_half_a_grey_level_per_channel() -> None:
    x = np.zeros((1, 3, 4, 5), np.float32)
    std = (0.2, 0.5, 1.0)
    y = perturbed(x, std, "NCHW", 0)
    for c, s in enumerate(std):
        assert 0 < np.abs(y[0, c]).max() <= 0.5 / 255 / s + 1e-9
    assert np.array_equal(y, perturbed(x, std, "NCHW", 0)) and not np.array_equal(y, perturbed(x, std, "NCHW", 1))
    z = perturbed(np.zeros((1, 4, 5, 3), np.float32), std, "NHWC", 0)
    assert np.abs(z[..., 0]).max() > np.abs(z[..., 2]).max()


def test_thresholds_hold_the_gate_on_a_sharp_sample_and_relax_to_twice_a_coarse_floor() -> None:
    assert thresholds(None, GATE) == GATE
    assert thresholds(np.array([0.99999, 0.001]), GATE) == GATE
    t = thresholds(np.array([0.925, 0.10]), GATE)  # the detector's faint scan
    assert t["cosine"] == pytest.approx(0.85) and t["norm_ratio"] == pytest.approx(0.25)
    assert thresholds(np.array([0.925, 0.2]), GATE)["norm_ratio"] == pytest.approx(0.4)


def test_a_coarse_sample_passes_near_its_floor_but_a_broken_one_still_fails() -> None:
    floors = [np.array([0.99999, 0.0]), np.array([0.925, 0.1])]
    ok = graded([[_p(0.995)], [_p(0.90, 0.1)]], floors, GATE, ["sharp.png", "faint.png"])
    assert all(c.passed for c in gate_checks("v", ok, GATE)) and ok["floored"] == ["faint.png"]
    assert ok["worst_all"]["cosine"] == pytest.approx(0.90)
    bad = graded([[_p(0.995)], [_p(0.58)]], floors, GATE, ["sharp.png", "faint.png"])
    checks = {c.name: c for c in gate_checks("v", bad, GATE)}
    assert not checks["v.cosine"].passed and bad["binding_sample"]["cosine"] == "faint.png"
    assert checks["v.cosine"].threshold == pytest.approx(0.85)  # the report says which bar it missed
    sharp = graded([[_p(0.985)], [_p(0.90)]], floors, GATE, ["sharp.png", "faint.png"])
    assert not all(c.passed for c in gate_checks("v", sharp, GATE))  # the sharp image holds the gate
    assert sharp["binding_sample"]["cosine"] == "sharp.png" and sharp["thresholds"]["cosine"] == 0.99


def test_the_search_scale_meets_the_budget_exactly_at_a_samples_own_threshold() -> None:
    floor = np.array([0.925, 0.1])
    assert on_gate_scale(0.85, floor, 0.99) == pytest.approx(0.99)
    assert on_gate_scale(0.80, floor, 0.99) < 0.99 < on_gate_scale(0.9, floor, 0.99)
    assert on_gate_scale(0.995, None, 0.99) == 0.995


def test_floor_of_compares_the_noisy_output_with_the_reference() -> None:
    ref = np.linspace(0.0, 1.0, 100).reshape(1, 1, 10, 10)
    f = floor_of(ref * 1.1, ref)
    assert f[0] == pytest.approx(1.0) and f[1] == pytest.approx(0.1)
    assert f[0] == compare(ref * 1.1, ref).cosine


def test_the_evaluator_scores_on_the_floor_scale_and_counts_the_norm() -> None:
    from stages.lib.qdq.sensitivity import Evaluator

    ref = [{"y": np.ones((1, 4), np.float32)}, {"y": np.ones((1, 4), np.float32)}]
    outs = [{"y": np.array([[1, 1, 1, 0.9]], np.float32)}, {"y": np.full((1, 4), 1.3, np.float32)}]
    plain = Evaluator([{}, {}], ref, ["y"], budget=0.99)
    floored = Evaluator([{}, {}], ref, ["y"], budget=0.99, floors=[np.array([1.0, 0.0]), np.array([1.0, 0.0])],
                        norm_limit=0.25)
    assert plain.score(outs) > 0.99  # cosine alone: a map 30 % too bright looks perfect
    assert floored.score(outs) < 0.99  # its norm is past the gate's 0.25
    relaxed = Evaluator([{}, {}], ref, ["y"], budget=0.99, floors=[np.array([1.0, 0.0]), np.array([1.0, 0.2])],
                        norm_limit=0.25)
    assert relaxed.score(outs) > 0.99  # that sample's own floor allows 0.4
