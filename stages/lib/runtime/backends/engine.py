"""One engine executor for TensorRT-RTX and full TensorRT (10 and 11): name-based tensor IO.

``EngineSession`` deserializes one engine and runs it with the runtime's own IO binding:
``set_input_shape`` per input, output shapes from ``get_tensor_shape``, ``set_tensor_address``
for every IO tensor, ``execute_async_v3`` on a driver stream (TensorRT 10 and 11 share exactly
this API; 11 removed the binding-index and v2 calls, which are not used). It looks like an
onnxruntime session (``get_inputs``/``get_outputs``/``run``), so ``stages.lib.hostside.generate.OrtPipeline``
drives engines with the same host code it drives ONNX graphs with.

The objects are typed against ``tensorrt-stubs`` (full TensorRT); the RTX bindings expose the
same classes under another module name, so both go through here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from stages.lib.dtypes import ORT_TYPES, TRT_NUMPY
from stages.lib.runtime.backends.cuda import Driver
from stages.lib.runtime.errors import PackageError

if TYPE_CHECKING:
    import tensorrt


def np_dtype(trt: Any, dt: Any) -> np.dtype[Any]:
    """numpy dtype of a TensorRT ``DataType`` (``trt.nptype``; by name where a build lacks it)."""
    nptype = getattr(trt, "nptype", None)
    if nptype is not None:
        try:
            return np.dtype(nptype(dt))
        except (TypeError, KeyError):
            pass
    name = str(getattr(dt, "name", dt)).split(".")[-1].upper()
    if name not in TRT_NUMPY:
        raise PackageError(f"engine IO of TensorRT type {name} has no numpy equivalent (bf16 IO is not supported)")
    return np.dtype(TRT_NUMPY[name])


@dataclass(frozen=True)
class TensorInfo:
    """What onnxruntime's ``NodeArg`` tells: name, ORT type string, shape (-1 -> axis name)."""

    name: str
    type: str
    shape: list[int | str]
    dtype: Any  # numpy dtype


class EngineSession:
    def __init__(self, trt: Any, runtime: tensorrt.Runtime, path: Path, driver: Driver,
                 io_spec: dict[str, Any] | None = None, log: list[str] | None = None,
                 refit_from: Path | None = None, logger: Any = None):
        self.trt, self.driver, self.path = trt, driver, path
        engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if engine is None:
            why = (log or ["no detail"])[-1]
            raise PackageError(f"{path.name}: the runtime could not deserialize the engine ({why})")
        self.engine: tensorrt.ICudaEngine = engine
        if refit_from is not None:
            self._refit(refit_from, logger, log or [])
        self.context: tensorrt.IExecutionContext = engine.create_execution_context()
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        is_in = {n: engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        order = [d["name"] for d in (io_spec or {}).get("outputs", []) if d.get("name") in names]
        outs = order + [n for n in names if not is_in[n] and n not in order]  # the ONNX graph's order
        self._inputs = [self._info(n) for n in names if is_in[n]]
        self._outputs = [self._info(n) for n in outs]
        self._buffers: dict[str, tuple[int, int]] = {}  # name -> (device pointer, capacity in bytes)

    def _refit(self, onnx: Path, logger: Any, log: list[str]) -> None:
        """Weight-stripped engine: its weights from the packaged ONNX (the parser's refitter)."""
        refitter: tensorrt.Refitter = self.trt.Refitter(self.engine, logger)
        parser: tensorrt.OnnxParserRefitter = self.trt.OnnxParserRefitter(refitter, logger)
        if not parser.refit_from_file(str(onnx)):
            errs = [str(parser.get_error(i).desc()) for i in range(parser.num_errors)]
            raise PackageError(f"{self.path.name}: refit from {onnx.name} failed: {'; '.join(errs) or 'no detail'}")
        if not refitter.refit_cuda_engine():
            raise PackageError(f"{self.path.name}: refit failed ({log[-1] if log else 'no detail'})")

    def _info(self, name: str) -> TensorInfo:
        dtype = np_dtype(self.trt, self.engine.get_tensor_dtype(name))
        dims = self.engine.get_tensor_shape(name)
        shape: list[int | str] = [int(d) if int(d) >= 0 else f"{name}.{i}" for i, d in enumerate(dims)]
        return TensorInfo(name, ORT_TYPES.get(dtype, f"tensor({dtype.name})"), shape, dtype)

    def get_inputs(self) -> list[TensorInfo]:
        return list(self._inputs)

    def get_outputs(self) -> list[TensorInfo]:
        return list(self._outputs)

    def _buffer(self, name: str, nbytes: int) -> int:
        ptr, cap = self._buffers.get(name, (0, -1))
        if nbytes > cap:
            if ptr:
                self.driver.free(ptr)
            ptr, cap = self.driver.alloc(nbytes), max(nbytes, 1)
            self._buffers[name] = (ptr, cap)
        return ptr

    def run(self, output_names: list[str] | None, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Host arrays in, host arrays out (in ``get_outputs`` order, or ``output_names``')."""
        ctx = self.context
        for info in self._inputs:
            if info.name not in feeds:
                raise ValueError(f"{self.path.name}: input {info.name!r} not fed")
            arr = np.ascontiguousarray(feeds[info.name], dtype=info.dtype)
            if not ctx.set_input_shape(info.name, tuple(arr.shape)):
                raise ValueError(f"{self.path.name}: input {info.name!r} of shape {arr.shape} is outside the "
                                 f"engine's profile")
            ptr = self._buffer(info.name, arr.nbytes)
            self.driver.upload(ptr, arr)
            ctx.set_tensor_address(info.name, ptr)
        shapes: dict[str, tuple[int, ...]] = {}
        for info in self._outputs:
            shape = tuple(int(d) for d in ctx.get_tensor_shape(info.name))
            if any(d < 0 for d in shape):
                raise ValueError(f"{self.path.name}: output {info.name!r} has a data-dependent shape {shape}")
            shapes[info.name] = shape
            nbytes = int(np.prod(shape, dtype=np.int64)) * info.dtype.itemsize
            ctx.set_tensor_address(info.name, self._buffer(info.name, nbytes))
        if not ctx.execute_async_v3(self.driver.stream_handle):
            raise RuntimeError(f"{self.path.name}: execute_async_v3 failed")
        self.driver.synchronize()
        wanted = output_names or [o.name for o in self._outputs]
        by_name = {o.name: o for o in self._outputs}
        return [self.driver.download(self._buffers[n][0], shapes[n], by_name[n].dtype) for n in wanted]

    def close(self) -> None:
        for ptr, _ in self._buffers.values():
            self.driver.free(ptr)
        self._buffers.clear()


class EngineBackend:
    """A package's engines on one GPU: one runtime, one driver context, a session per graph."""

    def __init__(self, name: str, trt: Any, pkg: Any, device_index: int = 0):
        from stages.lib.trt.backend import make_logger

        self.name, self.trt, self.pkg = name, trt, pkg
        self.log: list[str] = []
        self.driver = Driver(device_index)
        self.logger = make_logger(trt, self.log, verbose=False)
        self.runtime: tensorrt.Runtime = trt.Runtime(self.logger)
        self._sessions: dict[str, EngineSession] = {}

    def path(self, graph: str) -> Path:
        return Path(self.pkg.engine(graph))

    def session(self, graph: str) -> EngineSession:
        if graph not in self._sessions:
            p = self.path(graph)
            if not p.is_file():
                raise PackageError(f"{self.pkg.name}: engines/{graph}.engine is missing")
            refit = self.pkg.onnx(graph) if self.pkg.manifest.compat.weight_stripped else None
            self._sessions[graph] = EngineSession(self.trt, self.runtime, p, self.driver, self.pkg.io_spec(graph),
                                                  self.log, refit, self.logger)
        return self._sessions[graph]

    def describe(self) -> str:
        return f"{self.name} {getattr(self.trt, '__version__', '?')} (GPU {self.driver.device})"

    def close(self) -> None:
        for s in self._sessions.values():
            s.close()
        self._sessions.clear()
        self.driver.close()
