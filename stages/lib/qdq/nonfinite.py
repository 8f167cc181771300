"""Which layer made a NaN/Inf: the diagnosis after a calibration sample failed.

The collector (``calibrators.Collector``) sees only the tensors it calibrates, and the first bad
one it is handed may be far downstream of the layer that went wrong. The calibrate stage calls
``locate_nonfinite`` on the failing sample alone, so the error it raises names that layer; the
extra run is paid only when calibration has already failed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from stages.lib.qdq.calibrators import expose

if TYPE_CHECKING:
    import onnx_ir as ir


def _first_nonfinite(names: Iterable[str], outs: Mapping[str, Any], producer: Mapping[str, Any]) -> str | None:
    for name in names:
        x = outs.get(name)
        if x is not None and np.issubdtype(np.asarray(x).dtype, np.floating) and not np.isfinite(x).all():
            node = producer[name]
            return f"first NaN/Inf at tensor {name!r}, output of node {node.name} ({node.op_type})"
    return None


def locate_nonfinite(model: ir.Model | Path, feed: Mapping[str, np.ndarray]) -> str | None:
    """Re-run one failing sample with every node output exposed; name the first node (graph
    order) whose output is NaN/Inf, so the error points at the layer, not where it surfaced.
    A graph file runs segment by segment (``stages.lib.segments.runner``), stopping at the first
    segment with a bad value: one segment's values in memory, never the whole graph's."""
    from stages.lib.qdq.graphio import run, session

    if isinstance(model, (str, Path)):
        return _locate_segmented(Path(model), feed)
    names = [o.name for n in model.graph for o in n.outputs if o.name]
    outs = run(session(expose(model, names)), feed, names)
    return _first_nonfinite(names, outs, {o.name: n for n in model.graph for o in n.outputs if o.name})


class _Found(Exception):
    pass


def _locate_segmented(path: Path, feed: Mapping[str, np.ndarray]) -> str | None:
    import onnx

    from stages.lib.segments import runner as segments
    from stages.lib.segments.plan import Segment

    nodes = onnx.load(str(path), load_external_data=False).graph.node
    producer = {o: n for n in nodes for o in n.output if o}

    def check(seg: Segment, i: int, outs: dict[str, np.ndarray]) -> None:
        msg = _first_nonfinite([o for k in seg.nodes for o in nodes[k].output if o in outs], outs, producer)
        if msg:
            raise _Found(msg)

    try:
        segments.run_segmented(path, [feed], check, expose=list(producer))
    except _Found as e:
        return str(e)
    return None
