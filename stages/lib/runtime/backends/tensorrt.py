"""The ``tensorrt`` backend: full TensorRT engines (TensorRT 10 on JetPack, 10/11 on servers).

Only the API both major versions share is used (``stages.lib.runtime.backends.engine``).
``tensorrt-stubs`` installs a bare ``tensorrt/`` namespace of ``.pyi`` files, so importability
alone proves nothing: the module must have a ``Runtime``/``Builder`` (see ``trt_backend``).
"""

from __future__ import annotations

from typing import Any

from stages.lib.runtime.backends.engine import EngineBackend
from stages.lib.runtime.compat import INSTALL, import_bindings
from stages.lib.runtime.errors import IncompatibleError

NAME = "tensorrt"


def load_module() -> Any:
    mod, why = import_bindings(NAME)
    if mod is None or not hasattr(mod, "Runtime"):
        raise IncompatibleError(f"{NAME} backend needs TensorRT's Python bindings ({INSTALL[NAME]}); {why}")
    major = int(str(getattr(mod, "__version__", "0")).split(".")[0] or 0)
    if major not in (10, 11):
        raise IncompatibleError(f"{NAME} backend speaks TensorRT 10 and 11; this device has {mod.__version__}")
    return mod


def open_backend(pkg: Any, device_index: int = 0) -> EngineBackend:
    return EngineBackend(NAME, load_module(), pkg, device_index)
