"""The ``onnxruntime`` backend: the package's ONNX graphs on the CPU (no GPU, no TensorRT).

Graph optimizations follow what the build measured the gates with: ORT's defaults for
unquantized graphs (the export parity), none for Q/DQ graphs (the verify stage; with them on,
ORT fuses Q/DQ into integer kernels that reject FP8 and round differently from TensorRT).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from stages.lib.dtypes import UNQUANTIZED
from stages.lib.ortsession import ort_session
from stages.lib.runtime.compat import INSTALL
from stages.lib.runtime.errors import IncompatibleError, PackageError

NAME = "onnxruntime"


class OrtBackend:
    name = NAME

    def __init__(self, pkg: Any):
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise IncompatibleError(f"{NAME} backend needs onnxruntime ({INSTALL[NAME]}): {e}") from None
        self.ort, self.pkg = ort, pkg
        self._sessions: dict[str, Any] = {}

    def path(self, graph: str) -> Path:
        return Path(self.pkg.onnx(graph))

    def session(self, graph: str) -> Any:
        if graph not in self._sessions:
            p = self.path(graph)
            if not p.is_file():
                raise PackageError(f"{self.pkg.name}: onnx/{graph}.onnx is missing")
            precision = self.pkg.manifest.precision.get(graph, "fp16")
            quantized = precision not in UNQUANTIZED and precision != "export"
            self._sessions[graph] = ort_session(p, optimization="none" if quantized else "all")
        return self._sessions[graph]

    def describe(self) -> str:
        return f"{NAME} {self.ort.__version__} (CPU)"

    def close(self) -> None:
        self._sessions.clear()


def open_backend(pkg: Any, device_index: int = 0) -> OrtBackend:
    del device_index  # CPU
    return OrtBackend(pkg)
