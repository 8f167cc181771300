"""Parity metrics shared by every stage that compares outputs against a reference, and the gates
over them: the checks (``gate_checks``), which gate an export answers to, a row's status."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

if TYPE_CHECKING:
    from pipeline.stage import GateCheck

G = TypeVar("G")

# which way each figure must go; a gate names thresholds for some of them (pipeline.config.Gate)
GATE_DIRECTIONS = (("cosine", ">="), ("rel_l2", "<="), ("max_abs", "<="), ("norm_ratio", "<="),
                   ("top1", ">="), ("tokens", ">="), ("kl", "<="))


@dataclass(frozen=True)
class Parity:
    cosine: float
    rel_l2: float
    max_abs: float
    norm_ratio: float  # |‖out‖/‖ref‖ − 1|
    finite: bool

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def compare(out: np.ndarray, ref: np.ndarray) -> Parity:
    """Compare in float64 over the flattened tensors (shapes must match)."""
    if out.shape != ref.shape:
        raise ValueError(f"shape mismatch: got {out.shape}, reference {ref.shape}")
    a = np.asarray(out, dtype=np.float64).ravel()
    b = np.asarray(ref, dtype=np.float64).ravel()
    finite = bool(np.isfinite(a).all())
    if not finite:
        return Parity(float("nan"), float("inf"), float("inf"), float("inf"), False)
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if na == 0.0 and nb == 0.0:
        cos = 1.0
    elif na == 0.0 or nb == 0.0:
        cos = 0.0
    else:
        cos = float(np.dot(a, b) / (na * nb))
    rel = float(np.linalg.norm(a - b) / nb) if nb > 0 else float(np.linalg.norm(a - b))
    return Parity(
        cosine=cos,
        rel_l2=rel,
        max_abs=float(np.max(np.abs(a - b))) if a.size else 0.0,
        norm_ratio=abs(na / nb - 1.0) if nb > 0 else (0.0 if na == 0 else float("inf")),
        finite=True,
    )


def worst(parities: list[Parity]) -> Parity:
    """The worst figure of each metric over several comparisons (what a gate should see)."""
    return Parity(
        cosine=min(p.cosine for p in parities),
        rel_l2=max(p.rel_l2 for p in parities),
        max_abs=max(p.max_abs for p in parities),
        norm_ratio=max(p.norm_ratio for p in parities),
        finite=all(p.finite for p in parities),
    )


def min_cosine(outs: Mapping[str, np.ndarray], refs: Mapping[str, np.ndarray]) -> float:
    """The lowest cosine over the outputs ``refs`` names (a candidate is as good as its worst)."""
    return min(compare(np.asarray(outs[k]), np.asarray(refs[k])).cosine for k in refs)


def topk_agreement(logits: np.ndarray, ref_logits: np.ndarray, k: int = 1) -> float:
    """Share of positions whose reference top-1 token is within the output's top-k."""
    ref_top1 = np.argmax(ref_logits.reshape(-1, ref_logits.shape[-1]), axis=-1)
    out = logits.reshape(-1, logits.shape[-1])
    topk = np.argpartition(-out, kth=min(k, out.shape[-1] - 1), axis=-1)[:, :k] if k > 1 else np.argmax(out, -1)[:, None]
    return float(np.mean([r in row for r, row in zip(ref_top1, topk, strict=True)]))


# The least probability the reference's greedy token must lead its runner-up by for the choice to
# mean something: below it the reference is itself indifferent (sampling would take either). A
# random-weight model's softmax over a real vocabulary is flat: its leads are ~3e-5 (measured, 1.4 B
# probe, 151936 tokens) while its logit leads (~0.15) are far above an FP16 export's noise (0.007),
# so the noise rule alone counted 95 % of its positions and sent most of its layers back to FP16.
# A trained model's confident tokens lead by far more than 1 %.
MIN_PROB_LEAD = 0.01


def margins(logits: np.ndarray) -> np.ndarray:
    """The reference's leads at every position, [N, 2]: top-1 minus top-2 logit (what a
    perturbation must overcome to flip the greedy token) and top-1 minus top-2 probability;
    flattened over the leading axes."""
    flat = np.asarray(logits, dtype=np.float64).reshape(-1, logits.shape[-1])
    two = np.partition(flat, flat.shape[-1] - 2, axis=-1)[:, -2:]
    top = flat.max(axis=-1, keepdims=True)
    mass = np.exp(flat - top).sum(axis=-1)
    probs = np.exp(two - top) / mass[:, None]
    return np.stack([two[:, 1] - two[:, 0], probs[:, 1] - probs[:, 0]], axis=-1)


def decisive(ref_leads: np.ndarray, noise: float) -> np.ndarray:
    """The positions whose greedy token means something: the reference's logit lead is more than
    twice the unquantized export's measured logit error (``noise``: its worst |logit - reference|),
    so no perturbation as large as the export's own can flip it, and its probability lead is at
    least ``MIN_PROB_LEAD``. A random model's near-ties and flat softmax fall out; a trained
    model's confident tokens all count, so a real change cannot hide among them. ``ref_leads``:
    ``margins`` [N, 2], or [N] logit leads alone."""
    leads = np.asarray(ref_leads, dtype=np.float64)
    leads = leads.reshape(-1, leads.shape[-1]) if leads.ndim > 1 else leads.reshape(-1, 1)
    ok = leads[:, 0] > 2.0 * float(noise)
    return ok & (leads[:, 1] >= MIN_PROB_LEAD) if leads.shape[1] > 1 else ok


def kl_divergence(logits: np.ndarray, ref_logits: np.ndarray) -> np.ndarray:
    """KL(reference || output) in nats per position, from the logits (float64 log-softmax)."""
    def log_softmax(x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64).reshape(-1, x.shape[-1])
        x = x - x.max(axis=-1, keepdims=True)
        return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))

    lp, lq = log_softmax(ref_logits), log_softmax(logits)
    return np.maximum((np.exp(lp) * (lp - lq)).sum(axis=-1), 0.0)


@dataclass(frozen=True)
class Agreement:
    """Greedy-token agreement over the decisive positions (``decisive``), pooled: what the token
    gates read. ``agreement`` is None where no position was decisive (nothing to grade)."""

    agreed: int
    decisive: int
    positions: int

    @property
    def agreement(self) -> float | None:
        return self.agreed / self.decisive if self.decisive else None

    def __add__(self, other: Agreement) -> Agreement:
        return Agreement(self.agreed + other.agreed, self.decisive + other.decisive, self.positions + other.positions)


def decisive_agreement(tokens: np.ndarray, ref_tokens: np.ndarray, ref_margins: np.ndarray,
                       noise: float) -> Agreement:
    """How many decisive positions keep the reference's greedy token (``ref_margins``: the
    reference's ``margins`` at those positions)."""
    same = np.asarray(tokens).ravel() == np.asarray(ref_tokens).ravel()
    mask = decisive(ref_margins, noise)
    return Agreement(int(same[mask].sum()), int(mask.sum()), int(same.size))


def free_running_agreement(tokens: np.ndarray, ref_tokens: np.ndarray, ref_margins: np.ndarray,
                           noise: float) -> Agreement:
    """Greedy generation run freely (each side feeds back its own tokens): after the first
    divergence the two continue different texts, where the reference's leads no longer apply, so
    the decisive positions up to and including the first divergence count. A divergence at a
    near-tie grades nothing; one at a decisive position always counts against."""
    same = np.asarray(tokens).ravel() == np.asarray(ref_tokens).ravel()
    end = int(np.argmin(same)) + 1 if not same.all() else same.size
    mask = decisive(ref_margins, noise)[:end]
    return Agreement(int(same[:end][mask].sum()), int(mask.sum()), int(same.size))


def until_first_change(tokens: np.ndarray, ref_tokens: np.ndarray, ref_margins: np.ndarray,
                       noise: float) -> Agreement:
    """Teacher-forced tokens read as a text: the decisive positions up to and including the first
    decisive change count (a changed first token scores 0, a change late in the text little);
    near-tie flips are noise here as everywhere."""
    same = np.asarray(tokens).ravel() == np.asarray(ref_tokens).ravel()
    mask = decisive(ref_margins, noise)
    bad = np.flatnonzero(mask & ~same)
    end = int(bad[0]) + 1 if bad.size else same.size
    return Agreement(int((same & mask)[:end].sum()), int(mask[:end].sum()), int(same.size))


def decisive_top1(logits: np.ndarray, ref_logits: np.ndarray, noise: float) -> Agreement:
    """Next-token agreement at the reference's decisive positions (logits [..., V], same shape)."""
    ref = np.asarray(ref_logits).reshape(-1, ref_logits.shape[-1])
    out = np.asarray(logits).reshape(ref.shape)
    return decisive_agreement(out.argmax(-1), ref.argmax(-1), margins(ref), noise)


def export_noise(folder: Path) -> float:
    """The unquantized chain's measured logit error, which a decisive position must clear: the
    decoder export's parity, worst |logit - PyTorch| (``decoder.json`` ``parity.max_abs``, the
    image features from the exported vision graph: the whole unquantized chain), as fuse and
    quantize carry it along. 0 where no decoder export measured it."""
    import json

    meta = folder / "decoder.json"
    if not meta.is_file():
        return 0.0
    return float((json.loads(meta.read_text()).get("parity") or {}).get("max_abs") or 0.0)


def gate_checks(prefix: str, figures: Mapping[str, Any] | Parity, gate: Mapping[str, Any]) -> list[GateCheck]:
    """The one gate builder (the exports, quantize, engine, verify, the device's check): a check
    ``<prefix>.<figure>`` for every threshold the gate sets for a figure that was measured; a
    non-finite output never passes. Figures graded at per-sample noise floors
    (``parity.noise_floor.graded``) carry the binding sample's own ``thresholds``: those replace
    the gate's, for the figures they name."""
    from pipeline.stage import GateCheck

    figs = figures.as_dict() if isinstance(figures, Parity) else figures
    gate = {**gate, **(figs.get("thresholds") or {})}
    out = []
    for key, op in GATE_DIRECTIONS:
        if gate.get(key) is not None and key in figs:
            out.append(GateCheck.check(f"{prefix}.{key}", float(figs[key]), float(gate[key]), op))
    if figs.get("finite") is False:
        out.append(GateCheck.check(f"{prefix}.finite", 0.0, 1.0))
    return out


def export_gate(dtype: str, fp32: G, reduced: G) -> G:
    """The gate an export in graph ``dtype`` answers to (given the gates or their names): the FP32
    one (``gates.export``) for FP32; for FP16 and BF16 the reduced-precision one (``gates.fp16``),
    as their rounding can legitimately flip a near-tied token where ``gates.export`` asks for
    exact top-1 and tokens."""
    return fp32 if dtype == "fp32" else reduced


def gate_status(checks: Sequence[GateCheck]) -> str:
    """``pass`` | ``fail`` | ``ungated`` for a row of checks. Figures no gate covers (e.g. the token
    agreement of an int8 graph by default) are measured, not passed: a report must not show a 12%
    token agreement as a green "pass"."""
    if not checks:
        return "ungated"
    return "pass" if all(c.passed for c in checks) else "fail"
