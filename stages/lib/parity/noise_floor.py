"""The noise floor of a held-out image: how finely the model itself resolves it.

An 8-bit image knows each pixel to half a grey level. Where the reference model's output moves
visibly when the input moves by that much, no build can be graded finer than that on this image:
the PP-OCRv4 detector's map of skimage's low-contrast ``text.png`` (its maximum 0.37) moves to
cosine 0.925 and 10 % in norm under ±½ grey level, and an FP16 copy of the same graph changes its
norm by 27 %; a 0.9999 cosine gate on that image grades noise (issue 13). The decoder has the same
rule for its positions (``metrics.decisive``: a lead counts where it exceeds twice the export's own
error). Here every sample is graded, each at the coarser of the gate and twice its floor:
cosine ≥ min(gate, 1 − 2·(1 − floor cosine)), norm ratio ≤ max(gate, 2·floor norm ratio). A
well-resolved image is held to the gate; a coarse one still fails a build that is far worse than
its own noise (FP8 at cosine 0.58 on ``text.png`` against its 0.85).

The perturbation is uniform in ±½ grey level per pixel (the rounding an 8-bit image already
carries), applied in the graph's normalised input space (÷ std per channel), seeded per sample.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from stages.lib.parity.metrics import Parity, compare, worst

__all__ = ["FLOOR_FIGURES", "floor_of", "graded", "on_gate_scale", "perturbed", "thresholds"]

GREY_LEVEL = 1.0 / 255.0
FLOOR_FIGURES = ("cosine", "norm_ratio")  # what a floor records (np.array in this order)
SEED = 20261203


def perturbed(pixels: np.ndarray, std: Sequence[float], layout: str, index: int) -> np.ndarray:
    """``pixels`` (normalised, batch first) moved by up to ±½ grey level per pixel and channel."""
    rng = np.random.default_rng(SEED + index)
    shape = [1] * pixels.ndim
    shape[1 if layout == "NCHW" else -1] = len(std)
    scale = (0.5 * GREY_LEVEL / np.asarray(std, np.float64)).reshape(shape)
    noise = rng.uniform(-1.0, 1.0, size=pixels.shape) * scale
    return (pixels.astype(np.float64) + noise).astype(pixels.dtype)


def floor_of(noisy: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """The floor as stored beside a reference sample: [cosine, norm_ratio] of noisy vs ref."""
    p = compare(np.asarray(noisy).reshape(ref.shape), ref)
    return np.array([p.cosine, p.norm_ratio], np.float64)


def thresholds(floor: np.ndarray | Sequence[float] | None, gate: Mapping[str, Any]) -> dict[str, float]:
    """The sample's own cosine / norm_ratio thresholds: the gate's, relaxed to twice its floor."""
    out = {k: float(gate[k]) for k in FLOOR_FIGURES if gate.get(k) is not None}
    if floor is None:
        return out
    cos, norm = (float(v) for v in floor)
    if "cosine" in out:
        out["cosine"] = min(out["cosine"], 1.0 - 2.0 * (1.0 - cos))
    if "norm_ratio" in out:
        out["norm_ratio"] = max(out["norm_ratio"], 2.0 * norm)
    return out


def on_gate_scale(cosine: float, floor: np.ndarray | Sequence[float] | None, gate_cosine: float) -> float:
    """A sample's cosine mapped onto the gate's scale, so that it meets ``gate_cosine`` exactly when
    it meets its own threshold (the search's one number per candidate: the worst of these)."""
    thr = thresholds(floor, {"cosine": gate_cosine})["cosine"]
    if thr >= 1.0:
        return cosine
    return 1.0 - (1.0 - cosine) * (1.0 - gate_cosine) / (1.0 - thr)


def graded(per_sample: Sequence[Sequence[Parity]], floors: Sequence[np.ndarray | None], gate: Mapping[str, Any],
           names: Sequence[str] | None = None) -> dict[str, Any]:
    """Figures for ``gate`` over samples graded at their floors: for cosine and norm_ratio the
    binding sample's own figure (the one nearest to, or furthest past, its threshold) and, in
    ``thresholds``, that sample's threshold (what the gate check must compare with); the other
    figures the worst over all samples. ``floored`` names the samples whose floor relaxed the gate."""
    raw = worst([p for ps in per_sample for p in ps]).as_dict()
    out: dict[str, Any] = dict(raw)
    limits: dict[str, float] = {}
    binding: dict[str, Any] = {}
    for key, higher in (("cosine", True), ("norm_ratio", False)):
        if gate.get(key) is None:
            continue
        best: tuple[float, float, float, int] | None = None  # (excess, value, threshold, sample)
        for i, ps in enumerate(per_sample):
            thr = thresholds(floors[i], gate)[key]
            for p in ps:
                v = getattr(p, key)
                # how far past its own threshold, in units of that threshold's slack
                slack = (1.0 - thr) if higher else thr
                excess = ((thr - v) if higher else (v - thr)) / max(slack, 1e-12)
                if best is None or excess > best[0]:
                    best = (excess, v, thr, i)
        if best is not None:
            out[key], limits[key] = best[1], best[2]
            binding[key] = names[best[3]] if names else best[3]
    floored = [names[i] if names else i for i, f in enumerate(floors)
               if f is not None and thresholds(f, gate) != thresholds(None, gate)]
    out.update({"thresholds": limits, "binding_sample": binding, "floored": floored,
                "worst_all": raw})
    return out
