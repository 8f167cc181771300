"""Mixed precision: rank layer groups by the parity loss each causes, fall back the worst.

Each group (one attention or MLP block, one conv) is quantized alone and compared with the
unquantized graph in onnxruntime with optimizations disabled (NOTES §3: ORT's Q/DQ fusions
change rounding); then, starting from the fully quantized graph, the most harmful groups go
back to high precision one at a time until the graph meets the accuracy budget (cosine).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from stages.lib.qdq.recipe import Built, Calib, Recipe, build

if TYPE_CHECKING:
    import onnx

_LAYER = re.compile(r"(?:^|[/.])((?:layers|blocks|layer|h|block|resblocks)[./_]?\d+)(?:[/.]([^/.]+))?")


def group_of(node_name: str) -> str:
    """The layer group a node belongs to: `layers.3/self_attn`, `blocks.0/mlp`, or its module path.

    q/k/v/o projections of one attention block share a group: falling back one projection
    alone would still split TensorRT's fused MHA region.
    """
    m = _LAYER.search(node_name)
    if m:
        return m.group(1) + ("/" + m.group(2) if m.group(2) else "")
    return node_name.rsplit("/", 1)[0] if "/" in node_name.strip("/") else node_name


def min_cosine(outs: Mapping[str, np.ndarray], refs: Mapping[str, np.ndarray]) -> float:
    from stages.lib.metrics import compare

    return min(compare(np.asarray(outs[k]), np.asarray(refs[k])).cosine for k in refs)


class Evaluator:
    """Runs a candidate graph on fixed feeds and scores it against reference outputs."""

    def __init__(self, feeds: Sequence[Mapping[str, np.ndarray]], refs: Sequence[Mapping[str, np.ndarray]],
                 outputs: Sequence[str]):
        self.feeds, self.refs, self.outputs = feeds, refs, list(outputs)
        self.calls = 0

    def __call__(self, built: Built) -> float:
        from stages.lib.qdq.calibset import cast_feed
        from stages.lib.qdq.graphio import run, session

        self.calls += 1
        sess = session(built.model)
        cos = [min_cosine(run(sess, cast_feed(sess, f), self.outputs), {k: r[k] for k in self.outputs})
               for f, r in zip(self.feeds, self.refs, strict=True)]
        return float(min(cos))


@dataclass
class SensitivityReport:
    budget: float | None
    cosine_full: float  # everything the rules allow, quantized
    cosine_final: float
    met: bool
    ranking: list[dict[str, Any]] = field(default_factory=list)  # {"group","cosine_alone","loss"}
    kept: list[dict[str, Any]] = field(default_factory=list)  # {"group","nodes","why"}
    evaluations: int = 0

    def as_dict(self) -> dict[str, Any]:
        return self.__dict__.copy()


def run(proto: onnx.ModelProto, recipe: Recipe, calib: Calib, budget: float | None,
        evaluate: Callable[[Built], float]) -> tuple[Built, SensitivityReport]:
    """Quantize `proto`; with a budget, fall back the most harmful groups until cosine >= budget."""
    full = build(proto, recipe, calib)
    cos_full = evaluate(full)
    if budget is None:
        return full, SensitivityReport(None, cos_full, cos_full, True, evaluations=1)
    groups: dict[str, list[str]] = {}
    for node in sorted(full.placement.quantized_nodes()):
        groups.setdefault(group_of(full.placement.scopes.get(node) or node), []).append(node)
    all_nodes = {n for ns in groups.values() for n in ns}
    ranking: list[dict[str, Any]] = []
    for g, nodes in groups.items():
        others = {n: "sensitivity probe" for n in all_nodes - set(nodes)}
        cos = evaluate(build(proto, recipe, calib, keep_nodes=others))
        ranking.append({"group": g, "cosine_alone": cos, "loss": 1.0 - cos})
    ranking.sort(key=lambda r: -r["loss"])
    rep = SensitivityReport(budget, cos_full, cos_full, cos_full >= budget, ranking)
    best, cos = full, cos_full
    keep: dict[str, str] = {}
    for rank, r in enumerate(ranking, 1):
        if cos >= budget:
            break
        why = (f"sensitivity: quantized alone it drops cosine to {r['cosine_alone']:.5f} (rank {rank} of "
               f"{len(ranking)}); kept to meet accuracy_budget {budget}")
        for n in groups[r["group"]]:
            keep[n] = why
        best = build(proto, recipe, calib, keep_nodes=keep)
        cos = evaluate(best)
        rep.kept.append({"group": r["group"], "nodes": groups[r["group"]], "why": why, "cosine_after": cos})
    rep.cosine_final, rep.met = cos, cos >= budget
    rep.evaluations = 1 + len(ranking) + len(rep.kept)
    return best, rep
