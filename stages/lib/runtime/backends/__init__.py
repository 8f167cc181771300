"""Backends behind one interface: a session per packaged graph that looks like onnxruntime's.

``onnxruntime`` (the package's ONNX on the CPU), ``tensorrt_rtx`` (TensorRT-RTX engines) and
``tensorrt`` (full TensorRT 10/11 engines). Each backend module imports its bindings only when
opened. :func:`open_pipeline` binds ``stages.lib.hostside.generate.OrtPipeline`` to any backend's
sessions, so the host code between the graphs (image-feature merge, M-RoPE, KV cache) is the
one the build verified, whichever backend runs the graphs.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

if TYPE_CHECKING:
    from stages.lib.hostside.generate import OrtPipeline
    from stages.lib.runtime.compat import Compatibility
    from stages.lib.runtime.package import Package


class TensorArg(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def type(self) -> str: ...
    @property
    def shape(self) -> Sequence[int | str | None]: ...


class GraphSession(Protocol):
    """The slice of ``onnxruntime.InferenceSession`` the runtime uses."""

    def get_inputs(self) -> Sequence[TensorArg]: ...
    def get_outputs(self) -> Sequence[TensorArg]: ...
    def run(self, output_names: list[str] | None, feeds: dict[str, np.ndarray]) -> list[np.ndarray]: ...


class Backend(Protocol):
    name: str

    def path(self, graph: str) -> Path: ...
    def session(self, graph: str) -> GraphSession: ...
    def describe(self) -> str: ...
    def close(self) -> None: ...


MODULES = {"onnxruntime": "stages.lib.runtime.backends.onnxruntime",
           "tensorrt_rtx": "stages.lib.runtime.backends.tensorrt_rtx",
           "tensorrt": "stages.lib.runtime.backends.tensorrt"}


def open_backend(pkg: Package, compat: Compatibility) -> Backend:
    """The backend ``compat`` chose (it must be ok: see ``compat.check``/``compat.best_backend``)."""
    compat.require()
    mod = importlib.import_module(MODULES[compat.backend])
    backend: Backend = mod.open_backend(pkg, compat.device_index)
    return backend


def open_pipeline(pkg: Package, backend: Backend) -> OrtPipeline:
    """vision (if packaged) -> embed -> decoder with KV cache, over ``backend``'s sessions."""
    graphs = pkg.manifest.graphs
    for g in ("decoder", "embed"):
        if g not in graphs:
            raise ValueError(f"package {pkg.name} has no {g} graph (a vision-only package cannot generate)")
    vision = "vision" in graphs
    return pipeline_over(backend.session("decoder"), backend.session("embed"), pkg.text_spec(),
                         backend.session("vision") if vision else None, pkg.vision_spec() if vision else None)


def pipeline_over(decoder: GraphSession, embed: GraphSession, spec: Any, vision: GraphSession | None = None,
                  vision_spec: Any = None) -> OrtPipeline:
    """An ``OrtPipeline`` whose graphs are the given sessions (any backend's), not files it opens.

    The loop itself is ``stages.lib.hostside.generate``'s, one copy for the build's parity and the device.
    """
    from stages.lib.hostside.generate import OrtPipeline

    return OrtPipeline.from_sessions(decoder, embed, spec, vision, vision_spec)
