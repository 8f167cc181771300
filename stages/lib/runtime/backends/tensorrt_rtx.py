"""The ``tensorrt_rtx`` backend: TensorRT-RTX engines on a GeForce/RTX GPU (bindings imported lazily).

TensorRT-RTX compiles the engine's kernels for the local GPU when it is deserialized (its AOT
engines are portable across the SMs they were built for), so the first start is slower than
later ones. Before that, ``Runtime.get_engine_validity`` reads the engine header and says whether
this GPU, driver and runtime can run it -- a second opinion after the manifest check.
"""

from __future__ import annotations

from typing import Any

from stages.lib.runtime.backends.engine import EngineBackend
from stages.lib.runtime.compat import INSTALL, import_bindings
from stages.lib.runtime.errors import IncompatibleError

NAME = "tensorrt_rtx"


def load_module() -> Any:
    mod, why = import_bindings(NAME)
    if mod is None:
        raise IncompatibleError(f"{NAME} backend needs the TensorRT-RTX bindings ({INSTALL[NAME]}); {why}")
    return mod


def open_backend(pkg: Any, device_index: int = 0) -> EngineBackend:
    backend = EngineBackend(NAME, load_module(), pkg, device_index)
    for g in pkg.manifest.graphs:
        problem = engine_validity(backend, g)
        if problem:
            backend.close()
            raise IncompatibleError(f"package {pkg.name}: engines/{g}.engine cannot run here: {problem}")
    return backend


def engine_validity(backend: EngineBackend, graph: str) -> str | None:
    """None when the runtime says the engine is valid (or suboptimal) here, else its diagnosis."""
    rt: Any = backend.runtime
    if not hasattr(rt, "get_engine_validity"):
        return None
    trt = backend.trt
    with open(backend.path(graph), "rb") as f:
        header = f.read(int(getattr(rt, "engine_header_size", 64)))
    validity, diag = rt.get_engine_validity(header)
    if validity != trt.EngineValidity.INVALID:
        return None
    flags = [n.lower().replace("_", " ") for n, v in trt.EngineInvalidityDiagnostics.__members__.items()
             if int(diag) & int(v)]
    return ", ".join(flags) or (backend.log[-1] if backend.log else "invalid for this GPU")
