"""Where a graph splits into segments, and what each segment holds: the block runner's plan.

Segment k holds the nodes that are ancestors of cut k and in no earlier segment; the last holds
every remaining node. Each segment records the values it reads (graph inputs and values of
earlier segments), the values it makes that a later segment or the caller needs, and the
initializers it uses, so the runner (``stages.lib.segments.runner``) can build one segment's model at a
time and drop every value no later segment reads. Only the graph structure is read
(``load_external_data=False``): planning a 16 GB graph costs no weight bytes. Outer-scope values
an If/Loop body reads count as inputs of its node. The cuts default to the model's own
(``model_cuts``: the exporter's record, else torch's name scopes, ``stages.lib.segments.cuts``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import onnx

__all__ = ["Plan", "Segment", "model_cuts", "plan"]


@dataclass(frozen=True)
class Segment:
    index: int
    nodes: tuple[int, ...]  # positions in the graph's node list, graph order
    inputs: tuple[str, ...]  # graph inputs and values of earlier segments it reads
    outputs: tuple[str, ...]  # values later segments or the caller need, that it makes
    initializers: tuple[str, ...]


@dataclass
class Plan:
    path: Path
    proto: onnx.ModelProto  # the graph, external weights not read
    segments: list[Segment]
    wanted: list[str]  # values handed to the caller (graph outputs unless asked otherwise)
    later: list[set[str]]  # later[k]: values segments after k read (what stays carried)


def _reads(node: onnx.NodeProto) -> list[str]:
    """The node's inputs plus every outer-scope value its subgraphs (If/Loop/Scan bodies) read."""
    names = [n for n in node.input if n]
    for g in (g for a in node.attribute for g in ([a.g] if a.HasField("g") else []) + list(a.graphs)):
        local = {i.name for i in g.input} | {t.name for t in g.initializer}
        local |= {s.values.name for s in g.sparse_initializer}
        for n in g.node:
            names += [r for r in _reads(n) if r not in local]
            local.update(n.output)
    return names


def model_cuts(proto: onnx.ModelProto) -> list[str]:
    """The recorded cut list, else the one torch's name scopes give ([]: run whole)."""
    import onnx_ir as ir

    from stages.lib.segments.cuts import cuts_from_name_scopes, read_cuts

    return read_cuts(proto) or cuts_from_name_scopes(ir.from_proto(proto))


def plan(source: Path | str, cuts: Sequence[str] | None = None, expose: Sequence[str] | None = None) -> Plan:
    """Partition the graph at ``cuts`` (None: the model's own, ``model_cuts``). ``expose``: the
    values handed to the caller (None: the graph outputs); each segment exposes those it makes."""
    import onnx

    path = Path(source)
    proto = onnx.load(str(path), load_external_data=False)
    g = proto.graph
    cuts = model_cuts(proto) if cuts is None else list(cuts)
    inits = {t.name for t in g.initializer} | {s.values.name for s in g.sparse_initializer}
    graph_in = {v.name for v in g.input} - inits
    reads = [_reads(n) for n in g.node]
    producer = {o: i for i, n in enumerate(g.node) for o in n.output if o}
    wanted = list(dict.fromkeys([o.name for o in g.output] if expose is None else expose))
    for name in [*cuts, *wanted]:
        if name not in producer and name not in graph_in:
            raise ValueError(f"{path.name}: {name!r} is not a value the main graph computes "
                             f"({'segment cut' if name in cuts else 'requested output'})")
    unknown = next(((i, x) for i, r in enumerate(reads) for x in r if x not in producer and x not in graph_in
                    and x not in inits), None)
    if unknown:
        raise ValueError(f"{path.name}: node {g.node[unknown[0]].name or unknown[0]} reads {unknown[1]!r}, "
                         "which no node, graph input or initializer provides")
    owner = [-1] * len(g.node)
    groups: list[list[int]] = []
    for cut in cuts:
        todo = [producer[cut]] if cut in producer else []
        members: list[int] = []
        while todo:  # the cut's ancestors not yet in a segment
            i = todo.pop()
            if owner[i] != -1:
                continue
            owner[i] = len(groups)
            members.append(i)
            todo += [producer[x] for x in reads[i] if x in producer]
        if members:  # a cut already covered (or a graph input) adds no segment
            groups.append(sorted(members))
    rest = [i for i in range(len(g.node)) if owner[i] == -1]
    if rest or not groups:
        groups.append(rest)
    later: list[set[str]] = [set() for _ in groups]
    for k in range(len(groups) - 2, -1, -1):
        later[k] = later[k + 1] | {x for i in groups[k + 1] for x in reads[i] if x not in inits}
    segments = []
    wanted_set = set(wanted)
    for k, members in enumerate(groups):
        made = [o for i in members for o in g.node[i].output if o]
        made_set = set(made)
        seg_reads = list(dict.fromkeys(x for i in members for x in reads[i]))
        segments.append(Segment(
            index=k, nodes=tuple(members),
            inputs=tuple(x for x in seg_reads if x not in inits and x not in made_set),
            outputs=tuple(o for o in made if o in later[k] or o in wanted_set),
            initializers=tuple(x for x in seg_reads if x in inits)))
    return Plan(path, proto, segments, wanted, later)
