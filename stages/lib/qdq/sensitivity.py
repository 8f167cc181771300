"""Mixed precision: rank layer groups by the parity loss each causes, fall back the worst.

Each group (one attention or MLP block, one conv) is quantized alone and compared with the
unquantized graph in onnxruntime with optimizations disabled (docs/FIELD_NOTES.md §3: ORT's Q/DQ fusions
change rounding); then, starting from the fully quantized graph, the most harmful groups go
back to high precision until the graph meets the accuracy budget: the cosine, and where the
gate sets ``top1`` the decisive next-token agreement too (``qdq.objectives``: the decoder's own
tokens; the vision graph's through the unquantized decoder), folded into one score.

Every candidate runs through the block runner (``heldout.run_all``), written to disk first.
Where scoring a whole candidate per group would write and run more than ``RANK_WHOLE_BYTES``
(groups x the graph's weight bytes: 73 groups x 14 GB for an 8 B decoder, 63 x 1 GB for its
vision tower), groups are scored at their own block instead (as llm-compressor / ModelOpt rank
layers): the unquantized graph runs once, segment by segment at its block cuts (the recorded
ones, else the ``layers.N`` / ``blocks.N`` name scopes), keeping every segment's inputs and
outputs; each group is quantized alone, only the segment(s) holding it are cut out of the
candidate and run on the unquantized inputs, and the cosine of that block's output (the
residual stream at its cut, the logits for the last) ranks it.

The fallback walk scores whole candidates against the budget, few of them: it predicts how many
groups to keep from the ranking (``fallback_walk``: the losses add up, scaled to what the
measured candidates show) and corrects on each measurement.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from stages.lib.parity.metrics import compare, min_cosine
from stages.lib.qdq.recipe import Built, Calib, Recipe, build

if TYPE_CHECKING:
    import onnx

_LAYER = re.compile(r"(?:^|[/.])((?:layers|blocks|layer|h|block|resblocks)[./_]?\d+)(?:[/.]([^/.]+))?")
# groups x source weight bytes past which groups are scored at their own block: whole candidates
# would write and run that much (4 GiB: minutes on 2 cores; a tiny test graph stays whole)
RANK_WHOLE_BYTES = 4 * 1024**3
# whole candidates the fallback walk may score (each a full write and run: ~6 min at 8 B)
WALK_MOST = 4


def group_of(node_name: str) -> str:
    """The layer group a node belongs to: `layers.3/self_attn`, `blocks.0/mlp`, or its module path.

    q/k/v/o projections of one attention block share a group: falling back one projection
    alone would still split TensorRT's fused MHA region.
    """
    m = _LAYER.search(node_name)
    if m:
        return m.group(1) + ("/" + m.group(2) if m.group(2) else "")
    return node_name.rsplit("/", 1)[0] if "/" in node_name.strip("/") else node_name


class TokenScore(Protocol):
    """A second criterion next to the cosine (``qdq.objectives.TokenObjective``): the decisive
    next-token agreement of a candidate's outputs, and the agreement the search must reach."""

    @property
    def target(self) -> float: ...

    def agreement(self, outs: Sequence[Mapping[str, np.ndarray]]) -> float | None: ...


class Evaluator:
    """Runs a candidate graph on fixed feeds and scores it against reference outputs (which
    must come from the same runner: ``heldout.run_all``). Candidates are written under
    ``workdir`` (None: the system's temporary folder). With ``tokens`` the score is the cosine,
    or less where the decisive next-token agreement falls short of its target: mapped onto the
    cosine scale so that the target's agreement scores exactly ``budget`` (one number for the
    fallback walk to meet)."""

    def __init__(self, feeds: Sequence[Mapping[str, np.ndarray]], refs: Sequence[Mapping[str, np.ndarray]],
                 outputs: Sequence[str], workdir: Path | None = None,
                 values: Sequence[Mapping[str, np.ndarray]] | None = None,
                 tokens: TokenScore | None = None, budget: float | None = None,
                 floors: Sequence[Any] | None = None, norm_limit: float | None = None):
        self.feeds, self.refs, self.outputs, self.workdir = feeds, refs, list(outputs), workdir
        # per-sample noise floors (parity.noise_floor): each cosine counts on the budget's scale
        self.floors = list(floors) if floors is not None else None
        # the gate's |‖out‖/‖ref‖ − 1| limit, also on the cosine scale: a detector's map that
        # lights up everywhere keeps a fair cosine but its norm triples (PP-OCRv4 on a faint scan)
        self.norm_limit = norm_limit
        self.values = values  # every segment-crossing value of the refs' pass (block_scores.reference_pass)
        self.tokens, self.budget = tokens, budget
        self.calls = 0
        self.last_agreement: float | None = None

    def __call__(self, built: Built) -> float:
        from stages.lib.qdq.graphio import spilled

        with spilled(built.model, self.workdir) as path:
            return self.score(self.run(path))

    def run(self, path: Path) -> list[dict[str, np.ndarray]]:
        """The outputs of the graph saved at ``path`` on the feeds (a candidate the caller keeps)."""
        from stages.lib.qdq.heldout import run_all

        self.calls += 1
        return run_all(path, self.feeds, self.outputs)

    def cosine(self, outs: Sequence[Mapping[str, np.ndarray]]) -> float:
        cos = [min_cosine(o, {k: r[k] for k in self.outputs}) for o, r in zip(outs, self.refs, strict=True)]
        if self.floors is not None and self.budget is not None:
            from stages.lib.parity.noise_floor import on_gate_scale, thresholds

            cos = [on_gate_scale(c, f, self.budget) for c, f in zip(cos, self.floors, strict=True)]
            if self.norm_limit is not None:
                for o, r, f in zip(outs, self.refs, self.floors, strict=True):
                    limit = thresholds(f, {"norm_ratio": self.norm_limit})["norm_ratio"]
                    norm = max(compare(np.asarray(o[k]), np.asarray(r[k])).norm_ratio for k in self.outputs)
                    cos.append(1.0 - (norm / max(limit, 1e-12)) * (1.0 - self.budget))
        return float(min(cos))

    def score(self, outs: Sequence[Mapping[str, np.ndarray]]) -> float:
        cos = self.cosine(outs)
        if self.tokens is None or self.budget is None:
            return cos
        self.last_agreement = agree = self.tokens.agreement(outs)
        if agree is None:  # no decisive position: nothing the tokens could lose
            return cos
        mapped = 1.0 - (1.0 - agree) * (1.0 - self.budget) / max(1.0 - self.tokens.target, 1e-9)
        return min(cos, mapped)


@dataclass
class SensitivityReport:
    budget: float | None
    # scores: the cosine, or less where the decisive next-token agreement misses its target (Evaluator)
    score_full: float  # everything the rules allow, quantized
    score_final: float
    met: bool
    ranking: list[dict[str, Any]] = field(default_factory=list)  # {"group","cosine_alone","loss"[,"scored_at"]}
    kept: list[dict[str, Any]] = field(default_factory=list)  # {"group","nodes","why"}
    evaluations: int = 0
    scored: str = "whole graph"  # or "block": each group at its own segment's output
    walk: list[dict[str, Any]] = field(default_factory=list)  # {"kept_groups", "score"} per candidate scored

    def as_dict(self) -> dict[str, Any]:
        return self.__dict__.copy()


def run(source: onnx.ModelProto | Path | str, recipe: Recipe, calib: Calib, budget: float | None,
        evaluate: Callable[[Built], float], *, full: tuple[Built, float] | None = None,
        path: Path | None = None, report: Callable[[str], None] | None = None) -> tuple[Built, SensitivityReport]:
    """Quantize ``source``; with a budget, fall back the most harmful groups until cosine >=
    budget. ``full``: the fully quantized candidate and its score, when the caller has them.
    ``path``: the source's file, for block scoring past RANK_WHOLE_BYTES (``evaluate`` then must
    be an ``Evaluator``). ``report(message)``: progress, a line per group scored and candidate."""
    say = report or (lambda msg: None)
    from stages.lib.qdq import graphio
    from stages.lib.qdq.model_tensors import tensor_bytes

    if isinstance(source, (str, Path)):
        path = Path(source)
        source = graphio.load_proto(path, in_file=True)
    if full is None:
        b = build(source, recipe, calib)
        full = (b, evaluate(b))
    best, score_full = full
    if budget is None:
        return best, SensitivityReport(None, score_full, score_full, True, evaluations=1)
    groups: dict[str, list[str]] = {}
    for node in sorted(best.placement.quantized_nodes()):
        groups.setdefault(group_of(best.placement.scopes.get(node) or node), []).append(node)
    from stages.lib.qdq.block_scores import block_ranking, rank_cuts

    cuts = rank_cuts(source) if path is not None and isinstance(evaluate, Evaluator) else []
    block = bool(cuts) and len(groups) * tensor_bytes(source) > RANK_WHOLE_BYTES
    if block:
        ranking = block_ranking(path, source, recipe, calib, groups, evaluate, cuts, say)  # type: ignore[arg-type]
    else:
        ranking = []
        all_nodes = {n for ns in groups.values() for n in ns}
        for i, (g, nodes) in enumerate(groups.items()):
            say(f"sensitivity: group {i + 1}/{len(groups)} ({g}), whole graph")
            others = {n: "sensitivity probe" for n in all_nodes - set(nodes)}
            cos = evaluate(build(source, recipe, calib, keep_nodes=others))
            ranking.append({"group": g, "cosine_alone": cos, "loss": 1.0 - cos})
    ranking.sort(key=lambda r: -r["loss"])
    rep = SensitivityReport(budget, score_full, score_full, score_full >= budget, ranking,
                            scored="block" if block else "whole graph")
    where = " at its block's output" if block else ""
    whys = [f"sensitivity: quantized alone it drops cosine{where} to {r['cosine_alone']:.5f} (rank {rank} of "
            f"{len(ranking)}); kept to meet accuracy_budget {budget}" for rank, r in enumerate(ranking, 1)]
    built: dict[int, Built] = {0: best}

    def score(k: int) -> float:  # the candidate with the k most harmful groups kept high precision
        say(f"fallback: candidate keeping {k} of {len(ranking)} groups high precision (budget {budget:.5f})")
        keep = {n: whys[i] for i in range(k) for n in groups[ranking[i]["group"]]}
        built[k] = build(source, recipe, calib, keep_nodes=keep)
        return evaluate(built[k])

    k, tried = fallback_walk([r["loss"] for r in ranking], budget, score_full, score)
    for i in range(k):
        r = ranking[i]
        rep.kept.append({"group": r["group"], "nodes": groups[r["group"]], "why": whys[i], "cosine_after": tried.get(i + 1)})
    rep.score_final, rep.met = tried[k], tried[k] >= budget
    rep.walk = [{"kept_groups": n, "score": c} for n, c in sorted(tried.items())]
    rep.evaluations = len(ranking) + len(tried)  # block scores count one each
    return built[k], rep


def fallback_walk(losses: Sequence[float], budget: float, cos_none: float, score: Callable[[int], float],
                  most: int | None = None) -> tuple[int, dict[int, float]]:
    """How many of the ranked groups to keep, k, so that ``score(k)`` (the candidate with the k
    most harmful kept) meets ``budget``: few whole candidates, each a full write and run of the
    graph (minutes at 8 B), at most ``most`` (None: WALK_MOST) before keeping everything.

    ``losses``: each group's loss alone, most harmful first; R(k) = sum(losses[k:]) is what the
    groups still quantized would cost if losses added up (as ModelOpt's AutoQuantize sums
    per-layer scores). The first candidate assumes they do, scaled to the fully quantized
    graph's loss: 1 - score(k) = c * R(k). After that, the candidate's loss is interpolated in R
    between two measured candidates (regula falsi between the largest k that failed and the
    smallest that met; a secant through the last two failures while none has met), which also
    corrects for losses that do not add up (where it would keep everything, it tries halfway
    first; after a failure inside the bracket, at least its middle). It stops when the two are adjacent, when the model sees no k between them, or after
    ``most``. Exact in one candidate where losses add up.
    Returns k and every score taken ({0: cos_none} included); the candidate built for k is the
    last one ``score`` made for it."""
    most = WALK_MOST if most is None else most
    n = len(losses)
    tail = [0.0] * (n + 1)  # tail[k] = R(k)
    for i in range(n - 1, -1, -1):
        tail[i] = tail[i + 1] + max(float(losses[i]), 0.0)
    tried = {0: cos_none}
    if cos_none >= budget or n == 0:
        return 0, tried
    allowed = 1.0 - budget

    def target_tail(lo: int, hi: int | None) -> float:  # the R(k) the model says just meets it
        fails = sorted(k for k, c in tried.items() if c < budget)
        a, b = (lo, hi) if hi is not None else (fails[-2], fails[-1]) if len(fails) > 1 else (lo, lo)
        la, lb = 1.0 - tried[a], 1.0 - tried[b]
        if a != b and tail[a] != tail[b] and (la - lb) / (tail[a] - tail[b]) > 0:
            return tail[b] - (lb - allowed) * (tail[a] - tail[b]) / (la - lb)
        return tail[b] * allowed / lb if lb > 0 else tail[b]  # proportional (first, or noise)

    lo, hi = 0, None  # the largest k that failed, the smallest that met
    last_failed = False
    while len(tried) - 1 < most:
        r = target_tail(lo, hi)
        k = max(next(k for k in range(n + 1) if tail[k] <= r or k == n), lo + 1)
        if hi is not None and last_failed:  # regula falsi creeps up one side: halve the bracket
            k = max(k, (lo + hi) // 2)
        if hi is not None and k >= hi:
            break  # the model sees no smaller k that meets
        if k == n:  # nothing short of keeping everything: believed at the start; after a failure
            k = (lo + n + 1) // 2 if lo > 0 else n  # (a secant, which overshoots), halfway first
            if k >= n:
                break
        tried[k] = score(k)
        last_failed = tried[k] < budget
        lo, hi = (k, hi) if last_failed else (lo, k)
        if hi is not None and hi - lo <= 1:
            break
    if hi is None:  # nothing met within `most`: everything stays high precision
        tried[n] = score(n)
        return n, tried
    return hi, tried


# "gate" budgets aim this much inside the gate's cosine: the search scores calibration inputs
# against the unquantized graph, the gate held-out inputs against the PyTorch reference (whose
# own export error and unseen inputs the search does not see). 0.8: a 0.99 gate searches to 0.992.
GATE_MARGIN = 0.8


def search_budget(setting: float | str | None, gate: dict[str, Any]) -> float | None:
    """The cosine the mixed-precision fallback must reach, from ``quantize.<graph>.accuracy_budget``
    and the graph's quantize gate; None: no fallback ("off" / null)."""
    if setting is None or setting == "off":
        return None
    if setting == "gate":
        return 1.0 - (1.0 - float(gate["cosine"])) * GATE_MARGIN
    return float(setting)


# Generated tokens flip more often than prompt positions, and a few calibration prompts are a
# small sample: measured on the tiny default's FP8 decoder, calibration prompts kept >= 0.92 of
# their decisive next tokens while the held-out greedy tokens kept 0.78, and an unseen Qwen2.5-VL
# met 0.95 on calibration and 0.899 held out. The target sits well inside the gate (0.95 for 0.85).
TOKEN_MARGIN = 1 / 3


def token_target(gate: dict[str, Any]) -> float | None:
    """The decisive next-token agreement the search aims at on calibration prompts, inside the
    strictest of the gate's ``top1`` and ``tokens`` (0.95 for 0.85); None where the gate sets
    neither."""
    want = [float(v) for k in ("top1", "tokens") if (v := gate.get(k)) is not None]
    return None if not want else 1.0 - (1.0 - max(want)) * TOKEN_MARGIN
