"""Scoring one layer group at its own block: the sensitivity ranking past ``RANK_WHOLE_BYTES``.

The unquantized graph runs once, segment by segment at its block cuts, keeping each segment's
inputs and outputs; a candidate with one group quantized is cut down (``extract``) to the
segment(s) holding that group and run on those inputs, and the cosine of the block's output
ranks the group (``stages.lib.qdq.sensitivity`` has the why).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from stages.lib.qdq.recipe import Calib, Recipe, build

if TYPE_CHECKING:
    import onnx
    import onnx_ir as ir

__all__ = ["block_ranking", "extract", "rank_cuts", "reference_pass"]


class Scorer(Protocol):
    """What block scoring needs of the caller's evaluator (``sensitivity.Evaluator``); ``values``:
    every value its references' pass handed over, per feed (``reference_pass``), or None."""

    feeds: Sequence[Mapping[str, np.ndarray]]
    outputs: list[str]
    workdir: Path | None
    calls: int
    values: Sequence[Mapping[str, np.ndarray]] | None


def reference_pass(path: Path, feeds: Sequence[Mapping[str, np.ndarray]],
                   outputs: Sequence[str]) -> tuple[list[dict[str, np.ndarray]], list[dict[str, np.ndarray]]]:
    """The graph's ``outputs`` (float32, as ``heldout.run_all`` gives them) on ``feeds`` through
    the block runner at its recorded cuts, and every value a segment hands to a later one: the
    inputs block scoring cuts a group's segment out on, so the ranking needs no pass of its own
    (one full pass of the unquantized graph fewer: ~6 min for an 8 B decoder)."""
    from stages.lib.qdq.calibset import cast_feed
    from stages.lib.segments import runner as segments
    from stages.lib.segments.plan import plan

    p = plan(path)
    made = {o for seg in p.segments for i in seg.nodes for o in p.proto.graph.node[i].output}
    crossing = {x for seg in p.segments for x in (*seg.inputs, *seg.outputs) if x in made}
    values: list[dict[str, np.ndarray]] = [{} for _ in feeds]
    specs = segments.graph_inputs(path)
    segments.run_segmented(path, [cast_feed(specs, f) for f in feeds], _into(values),
                           expose=sorted(crossing | set(outputs)))
    for v, f in zip(values, feeds, strict=True):  # graph inputs a segment reads: the feed itself
        v.update((k, x) for k, x in cast_feed(specs, f).items() if k not in v)
    return [{k: np.asarray(v[k], np.float32) for k in outputs} for v in values], values


def rank_cuts(source: onnx.ModelProto) -> list[str]:
    """Where ``source`` splits into blocks for ranking: its recorded cuts, else its decoder
    ``layers.N`` or vision ``blocks.N`` name scopes ([]: it cannot be scored block by block)."""
    import onnx_ir as ir

    from stages.lib.segments.cuts import cuts_from_name_scopes, read_cuts

    if recorded := read_cuts(source):
        return recorded
    model = ir.from_proto(source)
    return cuts_from_name_scopes(model, "layers") or cuts_from_name_scopes(model, "blocks")


def block_ranking(path: Path, source: onnx.ModelProto, recipe: Recipe, calib: Calib,
                  groups: Mapping[str, list[str]], ev: Scorer, cuts: Sequence[str],
                  say: Callable[[str], None] = lambda msg: None) -> list[dict[str, Any]]:
    """Each group scored at the output of the segment(s) holding it, the graph split at ``cuts``
    (module docstring)."""
    import onnx_ir as ir

    from stages.lib.parity.metrics import min_cosine
    from stages.lib.qdq import graphio
    from stages.lib.qdq.calibset import cast_feed
    from stages.lib.qdq.placement import ensure_names
    from stages.lib.segments import runner as segments
    from stages.lib.segments.plan import plan

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
    needed = sorted({x for ins, outs in regions.values() for x in (*ins, *outs)})
    have = ev.values
    if have is not None and all(x in v for v in have for x in needed):
        refs = [{x: v[x] for x in needed} for v in have]  # the references' own pass (same runner, same cuts)
    else:
        refs = [{} for _ in ev.feeds]
        say(f"sensitivity: the unquantized graph, {len(p.segments)} blocks")
        segments.run_segmented(path, [cast_feed(specs, f) for f in ev.feeds], _into(refs), cuts=cuts, expose=needed)
    ranking = []
    all_nodes = {n for ns in groups.values() for n in ns}
    for i, (g, nodes) in enumerate(groups.items()):
        say(f"sensitivity: group {i + 1}/{len(groups)} ({g}) at its block")
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

    from stages.lib.segments.cuts import CUTS_KEY

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
