"""Mixed precision: rank layer groups by the parity loss each causes, fall back the worst.

Each group (one attention or MLP block, one conv) is quantized alone and compared with the
unquantized graph in onnxruntime with optimizations disabled (NOTES §3: ORT's Q/DQ fusions
change rounding); then, starting from the fully quantized graph, the most harmful groups go
back to high precision one at a time until the graph meets the accuracy budget (cosine).

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
from typing import TYPE_CHECKING, Any

import numpy as np

from stages.lib.qdq.recipe import Built, Calib, Recipe, build

if TYPE_CHECKING:
    import onnx
    import onnx_ir as ir

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


def min_cosine(outs: Mapping[str, np.ndarray], refs: Mapping[str, np.ndarray]) -> float:
    from stages.lib.metrics import compare

    return min(compare(np.asarray(outs[k]), np.asarray(refs[k])).cosine for k in refs)


class Evaluator:
    """Runs a candidate graph on fixed feeds and scores it against reference outputs (which
    must come from the same runner: ``heldout.run_all``). Candidates are written under
    ``workdir`` (None: the system's temporary folder)."""

    def __init__(self, feeds: Sequence[Mapping[str, np.ndarray]], refs: Sequence[Mapping[str, np.ndarray]],
                 outputs: Sequence[str], workdir: Path | None = None):
        self.feeds, self.refs, self.outputs, self.workdir = feeds, refs, list(outputs), workdir
        self.calls = 0

    def __call__(self, built: Built) -> float:
        from stages.lib.qdq.graphio import spilled

        with spilled(built.model, self.workdir) as path:
            return self.cosine(self.run(path))

    def run(self, path: Path) -> list[dict[str, np.ndarray]]:
        """The outputs of the graph saved at ``path`` on the feeds (a candidate the caller keeps)."""
        from stages.lib.qdq.heldout import run_all

        self.calls += 1
        return run_all(path, self.feeds, self.outputs)

    def cosine(self, outs: Sequence[Mapping[str, np.ndarray]]) -> float:
        cos = [min_cosine(o, {k: r[k] for k in self.outputs}) for o, r in zip(outs, self.refs, strict=True)]
        return float(min(cos))


@dataclass
class SensitivityReport:
    budget: float | None
    cosine_full: float  # everything the rules allow, quantized
    cosine_final: float
    met: bool
    ranking: list[dict[str, Any]] = field(default_factory=list)  # {"group","cosine_alone","loss"[,"scored_at"]}
    kept: list[dict[str, Any]] = field(default_factory=list)  # {"group","nodes","why"}
    evaluations: int = 0
    scored: str = "whole graph"  # or "block": each group at its own segment's output
    walk: list[dict[str, Any]] = field(default_factory=list)  # {"kept_groups", "cosine"} per candidate scored

    def as_dict(self) -> dict[str, Any]:
        return self.__dict__.copy()


def run(source: onnx.ModelProto | Path | str, recipe: Recipe, calib: Calib, budget: float | None,
        evaluate: Callable[[Built], float], *, full: tuple[Built, float] | None = None,
        path: Path | None = None) -> tuple[Built, SensitivityReport]:
    """Quantize ``source``; with a budget, fall back the most harmful groups until cosine >=
    budget. ``full``: the fully quantized candidate and its score, when the caller has them.
    ``path``: the source's file, for block scoring past RANK_WHOLE_BYTES (``evaluate`` then must
    be an ``Evaluator``)."""
    from stages.lib.qdq import graphio
    from stages.lib.qdq.model_tensors import tensor_bytes

    if isinstance(source, (str, Path)):
        path = Path(source)
        source = graphio.load_proto(path, in_file=True)
    if full is None:
        b = build(source, recipe, calib)
        full = (b, evaluate(b))
    best, cos_full = full
    if budget is None:
        return best, SensitivityReport(None, cos_full, cos_full, True, evaluations=1)
    groups: dict[str, list[str]] = {}
    for node in sorted(best.placement.quantized_nodes()):
        groups.setdefault(group_of(best.placement.scopes.get(node) or node), []).append(node)
    cuts = rank_cuts(source) if path is not None and isinstance(evaluate, Evaluator) else []
    block = bool(cuts) and len(groups) * tensor_bytes(source) > RANK_WHOLE_BYTES
    if block:
        ranking = block_ranking(path, source, recipe, calib, groups, evaluate, cuts)  # type: ignore[arg-type]
    else:
        ranking = []
        all_nodes = {n for ns in groups.values() for n in ns}
        for g, nodes in groups.items():
            others = {n: "sensitivity probe" for n in all_nodes - set(nodes)}
            cos = evaluate(build(source, recipe, calib, keep_nodes=others))
            ranking.append({"group": g, "cosine_alone": cos, "loss": 1.0 - cos})
    ranking.sort(key=lambda r: -r["loss"])
    rep = SensitivityReport(budget, cos_full, cos_full, cos_full >= budget, ranking,
                            scored="block" if block else "whole graph")
    where = " at its block's output" if block else ""
    whys = [f"sensitivity: quantized alone it drops cosine{where} to {r['cosine_alone']:.5f} (rank {rank} of "
            f"{len(ranking)}); kept to meet accuracy_budget {budget}" for rank, r in enumerate(ranking, 1)]
    built: dict[int, Built] = {0: best}

    def score(k: int) -> float:  # the candidate with the k most harmful groups kept high precision
        keep = {n: whys[i] for i in range(k) for n in groups[ranking[i]["group"]]}
        built[k] = build(source, recipe, calib, keep_nodes=keep)
        return evaluate(built[k])

    k, tried = fallback_walk([r["loss"] for r in ranking], budget, cos_full, score)
    for i in range(k):
        r = ranking[i]
        rep.kept.append({"group": r["group"], "nodes": groups[r["group"]], "why": whys[i], "cosine_after": tried.get(i + 1)})
    rep.cosine_final, rep.met = tried[k], tried[k] >= budget
    rep.walk = [{"kept_groups": n, "cosine": c} for n, c in sorted(tried.items())]
    rep.evaluations = len(ranking) + len(tried)  # block scores count one each
    return built[k], rep


def fallback_walk(losses: Sequence[float], budget: float, cos_none: float, score: Callable[[int], float],
                  most: int | None = None) -> tuple[int, dict[int, float]]:
    """How many of the ranked groups to keep, k, so that ``score(k)`` (the candidate with the k
    most harmful kept) meets ``budget``: few whole candidates, each a full write and run of the
    graph (minutes at 8 B), at most ``most`` (None: WALK_MOST) before keeping everything.

    ``losses``: each group's loss alone, most harmful first. Model: a candidate's loss adds up
    over the groups still quantized, 1 - score(k) ~ c * R(k) with R(k) = sum(losses[k:]) (as
    ModelOpt's AutoQuantize sums per-layer scores); c is fitted on a measured candidate, first
    the fully quantized one (1 - cos_none). The walk scores the smallest k the model says meets
    the budget, refits c there and repeats: while none has met, above the largest failed k; once
    one has, between the two (c from the met one), stopping when the model sees no smaller k or
    the two are adjacent. Exact where losses add up; otherwise the corrections keep it close.
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

    def predict(at: int) -> int:  # the smallest k meeting the budget, c fitted at a scored k
        c = (1.0 - tried[at]) / tail[at] if tail[at] > 0 else float("inf")
        return next(k for k in range(n + 1) if c * tail[k] <= allowed or k == n)

    lo, hi = 0, None  # the largest k that failed, the smallest that met
    while len(tried) - 1 < most:
        k = max(predict(lo if hi is None else hi), lo + 1)
        if hi is not None and k >= hi:
            break  # the model sees no smaller k that meets
        if k == n:
            break  # everything kept: no need to measure it yet
        tried[k] = score(k)
        lo, hi = (lo, k) if tried[k] >= budget else (k, hi)
        if hi is not None and hi - lo <= 1:
            break
    if hi is None:  # nothing met within `most`: everything stays high precision
        tried[n] = score(n)
        return n, tried
    return hi, tried


def rank_cuts(source: onnx.ModelProto) -> list[str]:
    """Where ``source`` splits into blocks for ranking: its recorded cuts, else its decoder
    ``layers.N`` or vision ``blocks.N`` name scopes ([]: it cannot be scored block by block)."""
    import onnx_ir as ir

    from stages.lib.segment_cuts import cuts_from_name_scopes, read_cuts

    if recorded := read_cuts(source):
        return recorded
    model = ir.from_proto(source)
    return cuts_from_name_scopes(model, "layers") or cuts_from_name_scopes(model, "blocks")


def block_ranking(path: Path, source: onnx.ModelProto, recipe: Recipe, calib: Calib,
                  groups: Mapping[str, list[str]], ev: Evaluator, cuts: Sequence[str]) -> list[dict[str, Any]]:
    """Each group scored at the output of the segment(s) holding it, the graph split at ``cuts``
    (module docstring)."""
    import onnx_ir as ir

    from stages.lib import segments
    from stages.lib.qdq import graphio
    from stages.lib.qdq.calibset import cast_feed
    from stages.lib.qdq.placement import ensure_names
    from stages.lib.segment_plan import plan

    p = plan(path, cuts, expose=ev.outputs)
    at_cut = set(cuts) | set(ev.outputs)
    fresh = ir.from_proto(source)
    ensure_names(fresh.graph)  # as build() names them; node i of the file is node i of every load
    nodes_at = list(fresh.graph)
    seg_of = {nodes_at[i].name: k for k, seg in enumerate(p.segments) for i in seg.nodes}
    made = [{o for i in seg.nodes for o in p.proto.graph.node[i].output} for seg in p.segments]
    regions = {}
    for g, nodes in groups.items():
        ks = sorted({seg_of[n] for n in nodes})
        span = range(ks[0], ks[-1] + 1)
        inside = set().union(*(made[k] for k in span))
        ins = list(dict.fromkeys(x for k in span for x in p.segments[k].inputs if x not in inside))
        last = p.segments[ks[-1]]
        regions[g] = (ins, [o for o in last.outputs if o in at_cut] or list(last.outputs))
    specs = segments.graph_inputs(path)
    refs: list[dict[str, np.ndarray]] = [{} for _ in ev.feeds]
    needed = sorted({x for ins, outs in regions.values() for x in (*ins, *outs)})
    segments.run_segmented(path, [cast_feed(specs, f) for f in ev.feeds], _into(refs), cuts=cuts, expose=needed)
    ranking = []
    all_nodes = {n for ns in groups.values() for n in ns}
    for g, nodes in groups.items():
        ins, outs = regions[g]
        cand = build(source, recipe, calib, keep_nodes={n: "sensitivity probe" for n in all_nodes - set(nodes)})
        sub = extract(cand.model, {x: refs[0][x].dtype for x in ins}, outs)
        got: list[dict[str, np.ndarray]] = [{} for _ in refs]
        with graphio.spilled(sub, ev.workdir) as sub_path:
            segments.run_segmented(sub_path, [{x: r[x] for x in ins} for r in refs],
                                   _into(got), cuts=[])
        cos = float(min(min_cosine(o, {k: r[k] for k in outs}) for o, r in zip(got, refs, strict=True)))
        ev.calls += 1
        ranking.append({"group": g, "cosine_alone": cos, "loss": 1.0 - cos, "scored_at": outs[0]})
    return ranking


def _into(got: list[dict[str, np.ndarray]]) -> Callable[[Any, int, dict[str, np.ndarray]], None]:
    """The runner's callback collecting each sample's values into ``got[i]``."""
    return lambda seg, i, values: got[i].update(values)


def extract(model: ir.Model, inputs: Mapping[str, Any], outputs: Sequence[str]) -> ir.Model:
    """Cut ``model`` (in place) down to what computes ``outputs`` from ``inputs`` (name: numpy
    dtype of the array fed; an inner value becomes a graph input of that type, any shape)."""
    import onnx_ir as ir
    from onnx_ir.passes.common import RemoveUnusedNodesPass

    from stages.lib.segment_cuts import CUTS_KEY

    g = model.graph
    values = {v.name: v for v in g.inputs}
    values.update((v.name, v) for n in g for v in n.outputs)
    new_inputs = []
    for name, dtype in inputs.items():
        old = values[name]
        if old.producer() is None:  # a graph input already: its declared type is what was fed
            new_inputs.append(old)
            continue
        new = ir.Value(name=name, type=ir.TensorType(ir.DataType.from_numpy(np.dtype(dtype))))
        old.name = f"{name}__upstream"
        ir.convenience.replace_all_uses_with(old, new)
        new_inputs.append(new)
    g.inputs.clear()
    g.inputs.extend(new_inputs)
    g.outputs.clear()
    g.outputs.extend(values[o] for o in outputs)
    RemoveUnusedNodesPass()(model)  # the other segments' nodes and weights
    model.metadata_props.pop(CUTS_KEY, None)  # its cut values are not all in here
    return model
