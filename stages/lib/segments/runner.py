"""Run an ONNX graph block by block, so a decoder bigger than memory still runs in onnxruntime.

A CPU session over an FP16 graph holds about twice its weights, and with graph optimizations
off (Q/DQ graphs) it grows with every run; a 7-8B decoder cannot run whole on a 24 GB machine.
Cut at the residual stream after each transformer layer (``segment_cuts``), it runs one layer at
a time on the previous block's activations, segment-major as llm-compressor's sequential
pipeline does: every sample through segment k, then segment k+1. Peak memory is one segment's
session plus the activations carried across the cut.

Which nodes, inputs, outputs and initializers each segment holds is the plan
(``stages.lib.segments.plan``, from the graph structure alone). Each segment's model gets its own
initializers, read when it is built: inline under the proto limit, else copied beside a
temporary copy of the segment (ORT refuses external data outside the model's folder).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from stages.lib.dtypes import ort_type
from stages.lib.segments.plan import Plan, Segment, plan

if TYPE_CHECKING:
    import onnx

    from stages.lib.ortsession import Optimization

__all__ = ["INLINE_LIMIT", "InputSpec", "graph_inputs", "run_segmented", "run_whole"]

INLINE_LIMIT: int | None = None  # segment tensor bytes kept inline; None: model_tensors.PROTO_LIMIT (tests lower it)
# (segment, sample index, {name: array}) for the wanted values the segment made
OnOutputs = Callable[[Segment, int, dict[str, np.ndarray]], None]


@dataclass(frozen=True)
class InputSpec:
    """A graph input as ORT's ``NodeArg`` describes it (``type`` like ``tensor(float16)``), read
    from the file without opening a session over the whole graph."""

    name: str
    type: str
    shape: list[int | str | None]


def graph_inputs(source: Path | str | onnx.ModelProto) -> list[InputSpec]:
    """The graph's inputs (initializer-backed ones left out), as a session would list them."""
    import onnx

    proto = source if isinstance(source, onnx.ModelProto) else onnx.load(str(source), load_external_data=False)
    inits = {t.name for t in proto.graph.initializer}
    out = []
    for v in proto.graph.input:
        if v.name in inits:
            continue
        tt = v.type.tensor_type
        dims: list[int | str | None] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                                        for d in tt.shape.dim]
        out.append(InputSpec(v.name, ort_type(tt.elem_type), dims))
    return out


def _carried_info(name: str, x: np.ndarray) -> onnx.ValueInfoProto:
    """A carried value's type from the array, every dim symbolic (samples differ in length)."""
    from onnx import helper

    dims = [f"{name}_d{i}" for i in range(x.ndim)]
    return helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(x.dtype), dims)


def _segment_proto(p: Plan, seg: Segment, sample: Mapping[str, np.ndarray]) -> onnx.ModelProto:
    """One segment's model: its nodes and initializers (external ones still unread)."""
    import onnx

    src = p.proto
    g = src.graph
    declared = {v.name: v for v in list(g.input) + list(g.output)}
    keep = set(seg.initializers)
    m = onnx.ModelProto(ir_version=src.ir_version, producer_name=src.producer_name, domain=src.domain)
    m.opset_import.extend(src.opset_import)
    m.functions.extend(src.functions)
    m.graph.name = f"{g.name}_segment{seg.index}"
    m.graph.node.extend(g.node[i] for i in seg.nodes)
    m.graph.initializer.extend(t for t in g.initializer if t.name in keep)
    m.graph.sparse_initializer.extend(s for s in g.sparse_initializer if s.values.name in keep)
    # graph inputs and outputs keep their declared types; carried values take the array's (a
    # value_info a rewrite left stale would make ORT reject a valid feed)
    m.graph.input.extend(declared[n] if n in declared else _carried_info(n, sample[n]) for n in seg.inputs)
    outs = set(seg.outputs)
    m.graph.output.extend(declared.get(n) or onnx.ValueInfoProto(name=n) for n in seg.outputs)
    made = {o for i in seg.nodes for o in g.node[i].output}
    m.graph.value_info.extend(v for v in g.value_info if v.name in made and v.name not in outs)
    return m


class _Session:
    """The ORT session of one segment; its temporary folder (if any) lives as long as it does."""

    def __init__(self, p: Plan, seg: Segment, sample: Mapping[str, np.ndarray], optimization: Optimization,
                 threads: int | None):
        import onnx
        from onnx.external_data_helper import load_external_data_for_model

        from stages.lib.ortsession import ort_session
        from stages.lib.qdq import model_tensors

        self.tmp: tempfile.TemporaryDirectory[str] | None = None
        src: str | bytes
        if len(p.segments) == 1 and set(seg.outputs) <= {o.name for o in p.proto.graph.output}:
            # the whole graph, nothing extra exposed: ORT opens the file itself and reads its
            # external data beside it (a rebuilt copy cost ~3x the weights: bytes, proto, session)
            self.sess = ort_session(p.path, optimization=optimization, threads=threads)
            # the file declares every graph input, read or not: ORT wants them all fed
            self.feeds = [i.name for i in self.sess.get_inputs()]
            missing = [n for n in self.feeds if n not in sample]
            if missing:
                raise ValueError(f"{p.path.name}: graph input {missing[0]!r} has no feed")
            return
        m = _segment_proto(p, seg, sample)
        limit = model_tensors.PROTO_LIMIT if INLINE_LIMIT is None else INLINE_LIMIT
        if model_tensors.tensor_bytes(m) < limit:
            load_external_data_for_model(m, str(p.path.parent))  # this segment's tensors only
            src = m.SerializeToString()
        else:
            self.tmp = tempfile.TemporaryDirectory(prefix="vlmforge-segment-")
            path = Path(self.tmp.name) / "segment.onnx"
            _copy_external(m, p.path.parent, path)
            onnx.save_model(m, str(path))
            src = str(path)
        del m  # ORT keeps its own copy: drop ours before it makes it
        self.sess = ort_session(src, optimization=optimization, threads=threads)
        self.feeds = list(seg.inputs)

    def close(self) -> None:
        del self.sess
        if self.tmp is not None:
            self.tmp.cleanup()


def _copy_external(m: onnx.ModelProto, base: Path, dst: Path) -> None:
    """Copy the segment's external tensors, one chunk at a time, into ``<dst>.data``."""
    import onnx
    from onnx.external_data_helper import ExternalDataInfo

    from stages.lib.qdq.model_tensors import proto_tensors

    offset = 0
    with open(dst.with_name(dst.name + ".data"), "wb") as out:
        for t in (t for t in proto_tensors(m) if t.data_location == onnx.TensorProto.EXTERNAL):
            info = ExternalDataInfo(t)
            src = base / info.location
            left = info.length or src.stat().st_size - (info.offset or 0)
            with open(src, "rb") as f:
                f.seek(info.offset or 0)
                while left > 0 and (chunk := f.read(min(left, 64 * 2**20))):
                    out.write(chunk)
                    left -= len(chunk)
            length = out.tell() - offset
            del t.external_data[:]  # (onnx's set_external_data wants the bytes in memory)
            for key, value in (("location", dst.name + ".data"), ("offset", str(offset)), ("length", str(length))):
                t.external_data.add(key=key, value=value)
            out.write(b"\0" * (-out.tell() % 65536))  # aligned, so ORT may map the next tensor
            offset = out.tell()


def run_segmented(source: Path | str, feeds: Sequence[Mapping[str, np.ndarray]], on_outputs: OnOutputs, *,
                  cuts: Sequence[str] | None = None, expose: Sequence[str] | None = None,
                  optimization: Optimization = "none", threads: int | None = 2,
                  progress: Callable[[int, int], None] | None = None) -> Plan:
    """Run every feed (already cast to the graph's input dtypes) through the graph, segment-major.

    ``on_outputs(segment, i, values)`` gets, per segment and sample, the ``expose``d values (None:
    the graph outputs) that segment made; exposed graph inputs come with the first segment.
    Values no later segment reads are dropped after each segment, and each segment's session is
    closed before the next opens. ``optimization``: ORT's level ("none" for Q/DQ graphs, docs/FIELD_NOTES.md
    §3); ``progress(k, n)`` before segment k of n. Returns the plan it ran."""
    p = plan(source, cuts, expose)
    carried = [dict(f) for f in feeds]  # the caller's feeds stay whole
    wanted = set(p.wanted)
    made_by = {o for s in p.segments for i in s.nodes for o in p.proto.graph.node[i].output}
    missing = next((n for s in p.segments for n in s.inputs if n not in made_by and any(n not in f for f in feeds)), None)
    if missing is not None:
        raise ValueError(f"{p.path.name}: graph input {missing!r} has no feed")
    for seg in p.segments if carried else []:
        if progress is not None:
            progress(seg.index, len(p.segments))
        sess = _Session(p, seg, carried[0], optimization, threads) if seg.outputs else None
        try:
            for i, values in enumerate(carried):
                made: dict[str, np.ndarray] = {}
                if sess is not None:
                    outs = sess.sess.run(list(seg.outputs), {n: values[n] for n in sess.feeds})
                    made = dict(zip(seg.outputs, outs, strict=True))
                hand = {n: x for n, x in made.items() if n in wanted}
                if seg.index == 0:
                    hand = {**{n: values[n] for n in p.wanted if n in values}, **hand}
                on_outputs(seg, i, hand)
                values.update((n, x) for n, x in made.items() if n in p.later[seg.index])
                for n in [n for n in values if n not in p.later[seg.index]]:
                    del values[n]
        finally:
            if sess is not None:
                sess.close()
    return p


def run_whole(source: Path | str, feed: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None,
              **kw: Any) -> dict[str, np.ndarray]:
    """One sample through the segmented graph: ``outputs`` (None: the graph outputs) by name, the
    parity users' equivalent of ``session.run``. ``kw``: ``run_segmented``'s options."""
    got: dict[str, np.ndarray] = {}
    p = run_segmented(source, [feed], lambda seg, i, values: got.update(values), expose=outputs, **kw)
    return {n: got[n] for n in p.wanted}
