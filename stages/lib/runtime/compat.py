"""Can this device run this package, on which backend? One line saying what is missing if not.

The device side is read, never guessed: the GPUs' compute capabilities from the CUDA driver
(``trt_backend.local_gpu_sms``, ctypes on libcuda) and the version of the TensorRT bindings a
backend would load. A package built for another SM or builder version is refused before any
engine is deserialized, with what it needs and what this device has. The ``onnxruntime``
backend runs the package's ONNX graphs on the CPU, so the engine checks do not apply to it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from stages.lib.runtime.errors import IncompatibleError
from stages.lib.runtime.package import Package

BACKENDS = ("tensorrt_rtx", "tensorrt", "onnxruntime")
BUILDER_OF = {"tensorrt_rtx": "tensorrt-rtx", "tensorrt": "tensorrt"}
BACKEND_OF = {v: k for k, v in BUILDER_OF.items()}
INSTALL = {
    "tensorrt_rtx": "pip install tensorrt-rtx-cu13-libs tensorrt-rtx-cu13-bindings",
    "tensorrt": "install TensorRT 10/11 with its Python bindings (JetPack ships TensorRT 10)",
    "onnxruntime": "pip install onnxruntime",
}
HW_COMPAT_MIN_SM = 80  # hardware-compatible engines (AMPERE_PLUS) run on SM 8.0 and newer


@dataclass(frozen=True)
class DeviceInfo:
    """What this machine offers: GPU compute capabilities (empty: no GPU or no driver) and the
    version of each TensorRT flavour that imports here (None: not importable, with why)."""

    sms: tuple[str, ...] = ()
    builders: dict[str, str | None] = field(default_factory=dict)
    why_not: dict[str, str] = field(default_factory=dict)


def import_bindings(backend: str) -> tuple[Any | None, str]:
    """The TensorRT module a backend uses (lazily imported), or None and why not."""
    from stages.lib.trt.backend import RTX_MODULES, import_real

    mod, errs = import_real(RTX_MODULES if backend == "tensorrt_rtx" else ("tensorrt",))
    return mod, "; ".join(errs)


def probe_device(backends: tuple[str, ...] = ("tensorrt_rtx", "tensorrt")) -> DeviceInfo:
    """Query the CUDA driver and (only for the named backends) import their bindings."""
    from stages.lib.trt.backend import local_gpu_sms

    sms = tuple(local_gpu_sms() or ())
    builders: dict[str, str | None] = {}
    why: dict[str, str] = {}
    for b in backends:
        if b not in BUILDER_OF:
            continue
        mod, err = import_bindings(b)
        builders[BUILDER_OF[b]] = str(getattr(mod, "__version__", "unknown")) if mod is not None else None
        if mod is None:
            why[BUILDER_OF[b]] = err
    return DeviceInfo(sms, builders, why)


@dataclass(frozen=True)
class Compatibility:
    """The verdict for one backend: ``ok``, or ``reason`` (one line: what the package needs)."""

    backend: str
    ok: bool
    reason: str | None = None
    device_index: int = 0  # the CUDA ordinal to run on (engine backends)
    note: str | None = None  # e.g. why the engines are not what runs

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def require(self) -> Compatibility:
        if not self.ok:
            raise IncompatibleError(self.reason or f"{self.backend}: incompatible")
        return self


def _version_ok(built: str, have: str, version_compatible: bool) -> bool:
    if built == have:
        return True
    if not version_compatible:
        return False
    b, h = built.split("."), have.split(".")
    try:  # version-compatible engines run on the same major, at the builder's version or newer
        return b[0] == h[0] and [int(x) for x in h[:3]] >= [int(x) for x in b[:3]]
    except ValueError:
        return False


def check(pkg: Package, backend: str, device: DeviceInfo) -> Compatibility:
    """Whether ``backend`` can run ``pkg`` on ``device`` (no engine is touched)."""
    m, t = pkg.manifest, pkg.manifest.target
    if backend not in BACKENDS:
        return Compatibility(backend, False, f"unknown backend {backend!r} (choose from {', '.join(BACKENDS)})")
    if backend == "onnxruntime":
        if not pkg.has_onnx():
            missing = [f"onnx/{g}.onnx" for g in m.graphs if not pkg.onnx(g).is_file()]
            return Compatibility(backend, False, f"package {pkg.name} has no ONNX graphs ({', '.join(missing)}); "
                                 f"the onnxruntime backend cannot run it (it needs {t.builder} on an SM {t.sm} GPU)")
        return Compatibility(backend, True, note="engines not run: the onnxruntime backend runs the package's "
                             "ONNX graphs on the CPU")
    builder = BUILDER_OF[backend]
    needs = f"{t.builder} {t.builder_version} on an NVIDIA GPU of SM {t.sm} ({t.name})"
    if t.builder != builder:
        return Compatibility(backend, False, f"package {pkg.name} needs {needs}; the {backend} backend runs "
                             f"{builder} engines (use --backend {BACKEND_OF.get(t.builder, t.builder)})")
    if not device.sms:
        return Compatibility(backend, False, f"{backend} backend needs an NVIDIA GPU with driver; none found "
                             f"(package {pkg.name} needs {needs})")
    have = device.builders.get(builder)
    if have is None:
        why = device.why_not.get(builder, "not importable")
        return Compatibility(backend, False, f"{backend} backend needs the {builder} Python bindings "
                             f"({INSTALL[backend]}); {why}")
    from pipeline.targets import sm_int  # here: pydantic loads only when engines are in question

    want = sm_int(t.sm)
    fits = [i for i, sm in enumerate(device.sms) if sm_int(sm) == want
            or (m.compat.hardware_compatible and sm_int(sm) >= HW_COMPAT_MIN_SM)]
    if not fits:
        need = f"SM {t.sm}" + (f" or any SM >= {HW_COMPAT_MIN_SM / 10:.1f} (hardware-compatible engines)"
                                if m.compat.hardware_compatible else "")
        return Compatibility(backend, False, f"package {pkg.name} needs an NVIDIA GPU of {need} (its engines "
                             f"were built for {t.name}); this device has SM {', '.join(device.sms)}")
    if not _version_ok(t.builder_version, have, m.compat.version_compatible):
        rule = "the same major, this version or newer" if m.compat.version_compatible else "exactly this version"
        return Compatibility(backend, False, f"package {pkg.name} needs {builder} {t.builder_version} ({rule}: "
                             f"its engines are tied to the builder); this device has {builder} {have}")
    if m.compat.weight_stripped and not pkg.has_onnx():
        return Compatibility(backend, False, f"package {pkg.name} has weight-stripped engines and no onnx/ "
                             f"to refit them from (rebuild with package.onnx on)")
    return Compatibility(backend, True, device_index=fits[0])


def best_backend(pkg: Package, device: DeviceInfo) -> Compatibility:
    """The best backend this device has for ``pkg``: its engines' runtime, else onnxruntime.

    When the engines cannot run here and the package has ONNX graphs, the verdict is onnxruntime
    with a note saying why the engines were passed over; when neither works, the engine reason.
    """
    engine_backend = BACKEND_OF.get(pkg.manifest.target.builder)
    first = check(pkg, engine_backend, device) if engine_backend else None
    if first is not None and first.ok:
        return first
    ort = check(pkg, "onnxruntime", device)
    if ort.ok and first is not None:
        return Compatibility("onnxruntime", True, note=f"engines not run: {first.reason}")
    return first if first is not None and not pkg.has_onnx() else ort
