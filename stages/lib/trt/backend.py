"""Which TensorRT module builds for a target, and whether this host can use it.

Two builders share one Python API (Builder / INetworkDefinition / OnnxParser / IBuilderConfig):
- ``tensorrt-rtx``: TensorRT for RTX, compiles ahead of time for a compute capability set in the
  builder config, with no GPU (CPU-only AOT). Import name ``tensorrt_rtx_bindings`` (standalone
  wheel) or ``tensorrt_rtx``.
- ``tensorrt``: full TensorRT, which times tactics on the GPU it runs on, so it needs the
  TensorRT libraries *and* a GPU of the target's SM.

A missing piece is a `StageError` naming it, never a silent skip. Note: `tensorrt-stubs` ships a
bare ``tensorrt/`` folder of ``.pyi`` files, so ``import tensorrt`` "succeeds" as an empty
namespace package where TensorRT is not installed: check for ``Builder``, not importability.
"""

from __future__ import annotations

import ctypes
import importlib
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from pipeline.stage import StageError

RTX_MODULES = ("tensorrt_rtx_bindings", "tensorrt_rtx")
RTX_INSTALL = "pip install tensorrt-rtx-cu13-libs tensorrt-rtx-cu13-bindings"


@dataclass(frozen=True)
class Backend:
    name: str  # "tensorrt-rtx" | "tensorrt"
    trt: Any  # the imported module (typed as Any: the two modules differ in a few RTX-only calls)
    module: str
    version: str

    @property
    def aot(self) -> bool:
        """Builds for a compute capability named in the config rather than the local GPU."""
        return self.name == "tensorrt-rtx"


def import_real(names: tuple[str, ...]) -> tuple[ModuleType | None, list[str]]:
    """The first of ``names`` that imports with a ``Builder`` (not the stubs' empty namespace),
    and one line per name tried that did not."""
    errors = []
    for n in names:
        try:
            mod = importlib.import_module(n)
        except Exception as e:  # an ImportError, or a broken install raising OSError on dlopen
            errors.append(f"{n}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            continue
        if hasattr(mod, "Builder"):
            return mod, errors
        errors.append(f"{n}: only type stubs are installed (no Builder)")
    return None, errors


def local_gpu_sms() -> list[str] | None:
    """Compute capabilities of the local GPUs via the CUDA driver, or None without a driver.

    ctypes on libcuda rather than torch or pycuda: cheap enough for `plan`, and it is exactly
    what full TensorRT needs at build time (a driver and a device).
    """
    lib = None
    for name in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            lib = ctypes.CDLL(name)
            break
        except OSError:
            continue
    if lib is None or lib.cuInit(0) != 0:
        return None
    count = ctypes.c_int(0)
    if lib.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return None
    out = []
    for i in range(count.value):
        dev, major, minor = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
        if lib.cuDeviceGet(ctypes.byref(dev), i) != 0:
            continue
        # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR = 75, _MINOR = 76
        lib.cuDeviceGetAttribute(ctypes.byref(major), 75, dev)
        lib.cuDeviceGetAttribute(ctypes.byref(minor), 76, dev)
        out.append(f"{major.value}.{minor.value}")
    return out


def host_problem(builder: str, sm: str) -> str | None:
    """Why this host cannot build for (builder, sm), or None when it can. Cheap: no build."""
    from pipeline.targets import sm_int  # here: it loads pydantic, which the device runtime need not

    if builder == "tensorrt-rtx":
        mod, errs = import_real(RTX_MODULES)
        if mod is None:
            return f"TensorRT-RTX is not importable ({'; '.join(errs)}); {RTX_INSTALL}"
        cc = getattr(mod, "ComputeCapability", None)
        if cc is None or not hasattr(cc, f"SM{sm_int(sm)}"):
            have = sorted(k for k in (cc.__members__ if cc is not None else {}) if k.startswith("SM"))
            return (f"TensorRT-RTX {getattr(mod, '__version__', '?')} cannot compile for SM {sm} "
                    f"(it targets: {', '.join(have) or 'none'}); use a full TensorRT target for this GPU")
        return None
    if builder == "tensorrt":
        mod, errs = import_real(("tensorrt",))
        if mod is None:
            return (f"full TensorRT is not importable here ({'; '.join(errs)}); it needs the TensorRT "
                    f"libraries and a GPU of SM {sm}: build this target on such a host")
        sms = local_gpu_sms()
        if not sms:
            return f"full TensorRT times kernels on the GPU it builds for: no CUDA GPU here (target SM {sm})"
        if sm not in sms:
            return f"full TensorRT needs a GPU of SM {sm}; this host has SM {', '.join(sms)}"
        return None
    return f"unknown builder {builder!r} (expected tensorrt-rtx or tensorrt)"


def resolve_backend(builder: str, sm: str) -> Backend:
    """Import the builder for a target, or raise a StageError saying what is missing."""
    problem = host_problem(builder, sm)
    if problem is not None:
        raise StageError(problem)
    names = RTX_MODULES if builder == "tensorrt-rtx" else ("tensorrt",)
    mod, _ = import_real(names)
    assert mod is not None  # host_problem imported it already
    return Backend(builder, mod, mod.__name__, str(getattr(mod, "__version__", "unknown")))


def make_logger(trt: Any, sink: list[str], verbose: bool = True) -> Any:
    """An ILogger of *this* module (the RTX and full bindings' classes are not interchangeable)."""
    sev = trt.ILogger.Severity
    floor = sev.VERBOSE if verbose else sev.WARNING
    names = {sev.INTERNAL_ERROR: "F", sev.ERROR: "E", sev.WARNING: "W", sev.INFO: "I", sev.VERBOSE: "V"}

    class _Logger(trt.ILogger):  # type: ignore[misc,name-defined]
        def __init__(self) -> None:
            super().__init__()

        def log(self, severity: Any, msg: str) -> None:
            if severity <= floor:
                sink.append(f"[{names.get(severity, '?')}] {msg}")

    return _Logger()


def make_progress_monitor(trt: Any, report: Any) -> Any | None:
    """IProgressMonitor → report(message, fraction) on the top-level phase, or None if absent."""
    base = getattr(trt, "IProgressMonitor", None)
    if base is None:
        return None

    class _Monitor(base):  # type: ignore[misc,valid-type]
        def __init__(self) -> None:
            super().__init__()
            self.steps: dict[str, int] = {}
            self.top: str | None = None

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            self.steps[phase_name] = max(int(num_steps), 1)
            if not parent_phase:
                self.top = phase_name
                report(f"trt: {phase_name}", 0.0)

        def step_complete(self, phase_name: str, step: int) -> bool:
            if phase_name == self.top:
                report(f"trt: {phase_name}", (step + 1) / self.steps[phase_name])
            return True  # False would cancel the build

        def phase_finish(self, phase_name: str) -> None:
            self.steps.pop(phase_name, None)

    return _Monitor()
