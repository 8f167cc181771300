"""The one place an onnxruntime session is made: onnxruntime only (no torch, no onnx), since the
generation pipeline a device runtime imports uses it too."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

Optimization = Literal["none", "basic", "extended", "all"]
_LEVELS = {"none": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED", "all": "ORT_ENABLE_ALL"}


def ort_session(model: str | Path | bytes, *, optimization: Optimization = "all",
                providers: Sequence[str] = ("CPUExecutionProvider",), log_level: int | None = 3,
                threads: int | None = None, arena: bool = False) -> Any:
    """A session on a model file (external data beside it) or serialized bytes. ``optimization``:
    ORT's graph optimization level ("all" is ORT's default; Q/DQ graphs need "none": ORT's Q/DQ
    fusions change rounding and reject FP8, docs/FIELD_NOTES.md §3; the quantized-graph reference is "none").
    ``log_level``: ORT severity, 3 (errors only) by default: at ORT's own default (2, warnings)
    every session prints one line per unused initializer it removes, noise in the stage logs.
    ``threads``: intra-op threads; None keeps ORT's default. ``arena`` is off by default: ORT's CPU arena keeps
    each run's high-water mark for the session's life, and over an FP16 graph with optimizations off
    it grew by the FP32 size of the weights on every run (measured on Qwen3-VL-8B's 1.15 GB vision
    graph: 3.0 GB after one run, 4.9 GB after two; without the arena 1.2 GB between runs, 3.0 GB
    peak). A build host cannot afford that; the speed it buys is small on CPU."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _LEVELS[optimization])
    if log_level is not None:
        so.log_severity_level = log_level
    if threads is not None:
        so.intra_op_num_threads = threads
    so.enable_cpu_mem_arena = arena
    sess = ort.InferenceSession(model if isinstance(model, bytes) else str(model), so, providers=list(providers))
    fp8 = {i.name: i.type for i in sess.get_inputs() if i.type in FP8_ELEM}
    return Fp8InputSession(sess, fp8) if fp8 else sess


# ORT type string of an FP8 input -> its ONNX element type (FLOAT8E4M3FN, FLOAT8E5M2)
FP8_ELEM = {"tensor(float8e4m3fn)": 17, "tensor(float8e5m2)": 19}


class Fp8InputSession:
    """A session over a graph with FP8 inputs (a quantized KV cache): its FP8 feeds arrive as
    their bit patterns in uint8 (``dtypes.FP8_BITS``), which ORT's binding cannot take as numpy
    (it knows no FP8 dtype), so each goes in as an OrtValue of the FP8 type. FP8 outputs already
    come back as uint8 bits. Everything else is the session's own."""

    def __init__(self, sess: Any, fp8: dict[str, str]):
        self.sess, self.fp8 = sess, fp8

    def run(self, names: Any, feed: Any, *args: Any) -> Any:
        import numpy as np
        import onnxruntime as ort

        def wrap(name: str, x: Any) -> Any:
            if name not in self.fp8 or isinstance(x, ort.OrtValue):
                return x
            bits = np.ascontiguousarray(x)
            if bits.dtype.itemsize != 1:
                raise ValueError(f"input {name} is {self.fp8[name]}: expected its bits as a 1-byte array, got {bits.dtype}")
            return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(bits.view(np.uint8), FP8_ELEM[self.fp8[name]])

        return self.sess.run(names, {k: wrap(k, v) for k, v in feed.items()}, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sess, name)


class LazySession:
    """A session opened on its first ``run`` (or first I/O question), with ``ort_session``'s
    options: a caller that must hold several graphs' sessions at different times (the export
    parity: the PyTorch reference first, then the graphs) passes them around before any of
    them costs memory, as Polygraphy's lazy loaders do."""

    def __init__(self, model: str | Path, **options: Any):
        self.model, self.options = model, options
        self._sess: Any = None

    def _open(self) -> Any:
        if self._sess is None:
            self._sess = ort_session(self.model, **self.options)
        return self._sess

    def get_inputs(self) -> Any:
        return self._open().get_inputs()

    def get_outputs(self) -> Any:
        return self._open().get_outputs()

    def run(self, names: Any, feed: Any) -> Any:
        return self._open().run(names, feed)
