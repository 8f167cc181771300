"""Device memory and a stream through the CUDA driver API (ctypes on libcuda): no torch, no pycuda.

The engine backends need exactly this much: allocate, copy host <-> device, a stream for
``execute_async_v3``, synchronize. The driver library comes with the GPU driver, so the light
runtime needs no CUDA toolkit wheel. The device's *primary* context is made current: it is the
context the CUDA runtime inside TensorRT uses, so both see the same allocations.
"""

from __future__ import annotations

import ctypes
from typing import Any

import numpy as np

from stages.lib.runtime.errors import IncompatibleError

_LIBS = ("libcuda.so.1", "libcuda.so", "nvcuda.dll")
ALIGN = 256  # bytes; TensorRT wants 256-byte aligned IO (cuMemAlloc aligns to at least this)


class CudaError(RuntimeError):
    pass


def _load() -> Any:
    for name in _LIBS:
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    raise IncompatibleError("the CUDA driver library (libcuda) is not here: an NVIDIA GPU with driver is needed")


class Driver:
    """One device's primary context, its allocations and one stream."""

    def __init__(self, ordinal: int = 0):
        lib = self.lib = _load()
        u64, vp = ctypes.c_uint64, ctypes.c_void_p
        lib.cuMemAlloc_v2.argtypes = [ctypes.POINTER(u64), ctypes.c_size_t]
        lib.cuMemFree_v2.argtypes = [u64]
        lib.cuMemcpyHtoD_v2.argtypes = [u64, vp, ctypes.c_size_t]
        lib.cuMemcpyDtoH_v2.argtypes = [vp, u64, ctypes.c_size_t]
        lib.cuStreamCreate.argtypes = [ctypes.POINTER(vp), ctypes.c_uint]
        lib.cuStreamSynchronize.argtypes = [vp]
        lib.cuStreamDestroy_v2.argtypes = [vp]
        lib.cuDevicePrimaryCtxRetain.argtypes = [ctypes.POINTER(vp), ctypes.c_int]
        lib.cuDevicePrimaryCtxRelease_v2.argtypes = [ctypes.c_int]
        lib.cuCtxSetCurrent.argtypes = [vp]
        self._call("cuInit", lib.cuInit(0))
        dev = ctypes.c_int()
        self._call("cuDeviceGet", lib.cuDeviceGet(ctypes.byref(dev), ordinal))
        self.device = dev.value
        ctx = vp()
        self._call("cuDevicePrimaryCtxRetain", lib.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), self.device))
        self.context = ctx
        self._call("cuCtxSetCurrent", lib.cuCtxSetCurrent(ctx))
        stream = vp()
        self._call("cuStreamCreate", lib.cuStreamCreate(ctypes.byref(stream), 0))
        self.stream = stream
        self._live: set[int] = set()

    def _call(self, what: str, rc: int) -> None:
        if rc != 0:
            name = ctypes.c_char_p()
            self.lib.cuGetErrorName(rc, ctypes.byref(name))
            raise CudaError(f"{what} failed: {(name.value or b'CUDA error').decode()} ({rc})")

    @property
    def stream_handle(self) -> int:
        return int(self.stream.value or 0)

    def alloc(self, nbytes: int) -> int:
        ptr = ctypes.c_uint64()
        # at least one aligned block: TensorRT wants a valid address even for an empty tensor
        self._call("cuMemAlloc", self.lib.cuMemAlloc_v2(ctypes.byref(ptr), max(int(nbytes), ALIGN)))
        self._live.add(ptr.value)
        return int(ptr.value)

    def free(self, ptr: int) -> None:
        if ptr in self._live:
            self._live.discard(ptr)
            self._call("cuMemFree", self.lib.cuMemFree_v2(ptr))

    def upload(self, ptr: int, arr: np.ndarray) -> None:
        a = np.ascontiguousarray(arr)
        if a.nbytes:
            self._call("cuMemcpyHtoD", self.lib.cuMemcpyHtoD_v2(ptr, a.ctypes.data, a.nbytes))

    def download(self, ptr: int, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        out = np.empty(shape, dtype=dtype)
        if out.nbytes:
            self._call("cuMemcpyDtoH", self.lib.cuMemcpyDtoH_v2(out.ctypes.data, ptr, out.nbytes))
        return out

    def synchronize(self) -> None:
        self._call("cuStreamSynchronize", self.lib.cuStreamSynchronize(self.stream))

    def close(self) -> None:
        for ptr in list(self._live):
            self.free(ptr)
        if self.stream:
            self.lib.cuStreamDestroy_v2(self.stream)
            self.stream = ctypes.c_void_p()
        self.lib.cuDevicePrimaryCtxRelease_v2(self.device)
