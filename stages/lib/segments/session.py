"""onnxruntime's session interface over the block runner, for code written against a session.

The generation loop (``stages.lib.hostside.generate.OrtPipeline``) and the export parity cases call
``get_inputs`` / ``get_outputs`` / ``run`` on a decoder session. Over a decoder too big to open
whole (an FP16 graph's CPU session holds ~2x its weights), ``SegmentedSession`` answers the same
calls by running each request through ``segments.run_whole``: one transformer block's session at
a time, every value crossing blocks carried. Each ``run`` rebuilds the block sessions, so it
trades time for memory: the caller decides when (``SEGMENT_ABOVE``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from stages.lib.ortsession import Optimization

__all__ = ["SEGMENT_ABOVE", "SegmentedSession", "decoder_session"]

# Above this many weight bytes a decoder runs block by block (memory; the sensitivity search
# decides by its own cost, sensitivity.RANK_WHOLE_BYTES).
SEGMENT_ABOVE = 2 * 1024**3


class SegmentedSession:
    def __init__(self, path: str | Path, optimization: Optimization = "all",
                 progress: Callable[[int, int], None] | None = None):
        import onnx

        from stages.lib.dtypes import ort_type
        from stages.lib.segments.runner import InputSpec, graph_inputs

        self.path = Path(path)
        self.optimization = optimization
        self.progress = progress  # (segment k, of n) in run_many: a pass over an 8 B decoder takes minutes
        self._inputs = graph_inputs(self.path)
        proto = onnx.load(str(self.path), load_external_data=False)
        self._outputs = [InputSpec(o.name, ort_type(o.type.tensor_type.elem_type),
                                   [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                                    for d in o.type.tensor_type.shape.dim]) for o in proto.graph.output]

    def get_inputs(self) -> list[Any]:
        return list(self._inputs)

    def get_outputs(self) -> list[Any]:
        return list(self._outputs)

    def run(self, names: Sequence[str] | None, feed: Mapping[str, Any]) -> list[Any]:
        from stages.lib.segments.runner import run_whole

        want = list(names) if names else [o.name for o in self._outputs]
        out = run_whole(self.path, feed, want, optimization=self.optimization)
        return [out[n] for n in want]

    def run_many(self, names: Sequence[str] | None, feeds: Sequence[Mapping[str, Any]]) -> list[list[Any]]:
        """Several independent calls in one segment-major pass: each block's session is built
        once for all of them, not once per call (what makes many calls affordable at 8 B)."""
        from stages.lib.segments.runner import run_segmented

        want = list(names) if names else [o.name for o in self._outputs]
        got: list[dict[str, Any]] = [{} for _ in feeds]
        run_segmented(self.path, feeds, lambda _seg, i, values: got[i].update(values), expose=want,
                      optimization=self.optimization, progress=self.progress)
        return [[g[n] for n in want] for g in got]


def decoder_session(path: str | Path, weight_bytes: int, optimization: Optimization = "all",
                    progress: Callable[[int, int], None] | None = None) -> Any:
    """A whole-graph session for a decoder under ``SEGMENT_ABOVE``, a ``SegmentedSession`` above."""
    from stages.lib.ortsession import ort_session

    if weight_bytes > SEGMENT_ABOVE:
        return SegmentedSession(path, optimization, progress)
    return ort_session(Path(path), optimization=optimization)
