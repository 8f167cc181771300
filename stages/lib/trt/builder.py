"""One engine builder over the TensorRT Python API, for `tensorrt` and `tensorrt_rtx` alike.

The network is strongly typed: the ONNX graph's dtypes and explicit Q/DQ decide every layer's
precision (docs/FIELD_NOTES.md §2 rule 9), so no precision flags are set and what the quantize stage wrote is
what the engine runs. The builder objects are typed against `tensorrt-stubs` (full TensorRT);
the RTX-only calls (compute capability) go through `getattr` in one place.
"""

from __future__ import annotations

import hashlib
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.stage import StageError
from pipeline.targets import sm_int
from pipeline.worker import AnonPeak, peak_rss_mb
from stages.lib.dtypes import ONNX_LOW_PRECISION
from stages.lib.trt import timing_cache as trt_timing_cache
from stages.lib.trt.backend import Backend, local_gpu_sms, make_logger, make_progress_monitor

if TYPE_CHECKING:
    import tensorrt

Shape = tuple[int, ...]
ProfileSpec = Mapping[str, tuple[Shape, Shape, Shape]]  # input name -> (min, opt, max)
Report = Callable[[str, "float | None"], None]


@dataclass(frozen=True)
class BuildOptions:
    workspace_mb: int = 1024
    optimization_level: int = 3
    hardware_compatible: bool = False
    version_compatible: bool = False
    weight_stripped: bool = False
    timing_cache_dir: Path | None = None  # None: build without a persistent timing cache
    target_name: str = ""  # names the timing-cache file
    # TensorRT-RTX >= 1.2 accepts the timing-cache calls but ignores them (its deprecation warning
    # says "no-ops"), so the cache is attached for full TensorRT only; True attaches it anyway,
    # which `bench/timing_cache.py` uses to show the no-op by measurement.
    timing_cache_on_rtx: bool = False


@dataclass
class BuildResult:
    path: Path
    bytes: int
    sha256: str
    seconds: float
    peak_rss_mb: float
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    log: list[str]
    options_applied: list[str] = field(default_factory=list)
    options_unavailable: list[str] = field(default_factory=list)
    timing_cache: dict[str, Any] | None = None
    # the builder's own share (parser + builder), anonymous memory: RssAnon before the parse and
    # its peak from the parse to the plan written (the process's VmHWM above also counts pages of
    # the mapped weight files and everything the stage held before)
    anon_before_mb: float = 0.0
    builder_anon_mb: float = 0.0


def _dtype_name(dt: Any) -> str:
    return str(getattr(dt, "name", dt)).split(".")[-1].lower()


def _dims(t: tensorrt.ITensor) -> list[int]:
    d = t.shape
    return [int(d[i]) for i in range(len(d))]


def _io(t: tensorrt.ITensor) -> dict[str, Any]:
    return {"name": t.name, "dtype": _dtype_name(t.dtype), "shape": _dims(t)}


def _parse(trt: Any, network: tensorrt.INetworkDefinition, logger: Any, onnx_path: Path) -> None:
    parser: tensorrt.OnnxParser = trt.OnnxParser(network, logger)
    # parse_from_file (not parse(bytes)) so external data (`*.onnx.data`) resolves next to the model
    if not parser.parse_from_file(str(onnx_path)):
        errs = [str(parser.get_error(i).desc()) for i in range(parser.num_errors)]
        raise StageError(f"{onnx_path.name}: the ONNX parser failed: {'; '.join(errs[:3]) or 'no detail'}")


def _set_profile(builder: tensorrt.Builder, network: tensorrt.INetworkDefinition,
                 config: tensorrt.IBuilderConfig, spec: ProfileSpec, graph: str) -> None:
    profile = builder.create_optimization_profile()
    dynamic = []
    for i in range(network.num_inputs):
        t = network.get_input(i)
        shape = _dims(t)
        if t.name not in spec:
            if any(d < 0 for d in shape):
                dynamic.append(t.name)
            continue
        lo, opt, hi = spec[t.name]
        for s in (lo, opt, hi):
            if len(s) != len(shape) or any(d >= 0 and d != v for d, v in zip(shape, s, strict=True)):
                raise StageError(f"{graph}: profile shape {list(s)} does not fit input {t.name} {shape}")
        if t.is_shape_tensor:
            profile.set_shape_input(t.name, list(lo), list(opt), list(hi))
        else:
            profile.set_shape(t.name, lo, opt, hi)
    if dynamic:
        raise StageError(f"{graph}: dynamic inputs without a profile: {', '.join(dynamic)}")
    if config.add_optimization_profile(profile) < 0:
        raise StageError(f"{graph}: TensorRT rejected the optimization profile {spec}")


def _configure(backend: Backend, config: tensorrt.IBuilderConfig, sm: str, opts: BuildOptions,
               result: BuildResult) -> None:
    trt = backend.trt
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, opts.workspace_mb << 20)
    config.builder_optimization_level = opts.optimization_level
    # DETAILED + a VERBOSE logger puts the engine's layer list (with precisions) into the log
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    if backend.aot:
        cc = getattr(trt.ComputeCapability, f"SM{sm_int(sm)}")
        cfg: Any = config  # RTX-only API, absent from tensorrt-stubs
        cfg.num_compute_capabilities = 1
        if not cfg.set_compute_capability(cc, 0):
            raise StageError(f"TensorRT-RTX refused compute capability SM {sm}")
        result.options_applied.append(f"compute_capability=SM{sm_int(sm)}")
    flags = trt.BuilderFlag
    if opts.hardware_compatible:
        level = getattr(getattr(trt, "HardwareCompatibilityLevel", None), "AMPERE_PLUS", None)
        if level is None or sm_int(sm) < 80:
            result.options_unavailable.append(f"hardware_compatible (needs SM >= 8.0 and {backend.name} support)")
        else:
            config.hardware_compatibility_level = level
            result.options_applied.append("hardware_compatibility_level=AMPERE_PLUS")
    if opts.weight_stripped and backend.aot and not local_gpu_sms():
        # measured with TensorRT-RTX 1.7: any REFIT*/STRIP_PLAN flag makes Myelin JIT-compile
        # through CUDA at build time, which fails on a CPU-only host (CHECK(status == CUDA_SUCCESS))
        raise StageError(f"weight-stripped (refittable) engines need a GPU at build time with TensorRT-RTX "
                         f"{backend.version}; this host has none: set engine.weight_stripped: false here")
    # RTX wheels ship no lean runtime (libnvinfer_lean) to embed: exclude it, the runtime brings its own
    vc = ("VERSION_COMPATIBLE", "EXCLUDE_LEAN_RUNTIME") if backend.aot else ("VERSION_COMPATIBLE",)
    for wanted, names in ((opts.version_compatible, vc), (opts.weight_stripped, ("STRIP_PLAN", "REFIT_IDENTICAL"))):
        for n in names if wanted else ():
            if hasattr(flags, n):
                config.set_flag(getattr(flags, n))
                result.options_applied.append(n)
            else:
                result.options_unavailable.append(f"{n} ({backend.name} {backend.version} has no such flag)")


def _quiet(message: str, fraction: float | None = None) -> None:
    pass


def build_engine(backend: Backend, onnx_path: Path, out_path: Path, sm: str, profile: ProfileSpec,
                 opts: BuildOptions, report: Report | None = None, graph: str = "") -> BuildResult:
    """Parse, configure and build one engine into `out_path`; StageError on any failure."""
    trt = backend.trt
    graph = graph or onnx_path.stem
    say: Report = report or _quiet
    log: list[str] = []
    logger = make_logger(trt, log)
    before = AnonPeak().read()  # no thread: one reading
    builder: tensorrt.Builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    _parse(trt, network, logger, onnx_path)
    config = builder.create_builder_config()
    result = BuildResult(out_path, 0, "", 0.0, 0.0, [_io(network.get_input(i)) for i in range(network.num_inputs)],
                         [_io(network.get_output(i)) for i in range(network.num_outputs)], log)
    _configure(backend, config, sm, opts, result)
    _set_profile(builder, network, config, profile, graph)
    def graph_say(m: str, f: float | None = None) -> None:
        say(f"{graph}: {m}", f)

    monitor = make_progress_monitor(trt, graph_say)
    if monitor is not None:
        config.progress_monitor = monitor
    cache = use = None
    if opts.timing_cache_dir is not None and backend.aot and not opts.timing_cache_on_rtx:
        result.timing_cache = {"used": False, "reason": f"TensorRT-RTX {backend.version} ignores timing caches "
                               "(its timing-cache calls are no-ops since 1.2: no host-side tactic timing)"}
    elif opts.timing_cache_dir is not None:
        path = trt_timing_cache.cache_path(opts.timing_cache_dir, opts.target_name or f"sm{sm}", sm,
                                           backend.name, backend.version)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # RTX's "no-op" notice, when forced
            cache, use = trt_timing_cache.attach(config, path)
    say(f"{graph}: building ({backend.name} {backend.version}, SM {sm})", None)
    t0 = time.perf_counter()
    sampler = AnonPeak().start()  # the builder releases the GIL: the sampler sees inside it
    try:
        written = _serialize(trt, builder, network, config, out_path)
    finally:
        sampler.stop()
    result.seconds = time.perf_counter() - t0
    result.anon_before_mb, result.builder_anon_mb = before, max(0.0, sampler.read() - before)
    if written is None:
        errs = [ln for ln in log if ln.startswith(("[E]", "[F]"))]
        # a CPU-only host logs a CUDA-driver error after the real one when the stream build aborts
        errs = [e for e in errs if "CUDA driver version is insufficient" not in e] or errs
        raise StageError(f"{graph}: {backend.name} build failed for SM {sm}: "
                         f"{errs[-1][4:].splitlines()[0] if errs else 'no error logged'}")
    if cache is not None and use is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            trt_timing_cache.save(config, cache, use)
        result.timing_cache = {"used": True, **use.as_dict()}
    result.bytes, result.sha256 = written
    result.peak_rss_mb = peak_rss_mb()  # the worker process's peak so far (one node per process)
    say(f"{graph}: built {result.bytes / 1e6:.1f} MB in {result.seconds:.1f}s", 1.0)
    return result


def _serialize(trt: Any, builder: Any, network: Any, config: Any, out_path: Path) -> tuple[int, str] | None:
    """Build the plan straight into ``out_path`` (bytes, sha256), or None when the build failed.

    ``build_serialized_network_to_stream`` hands the plan to a writer piece by piece instead of
    returning one host buffer: measured with TensorRT-RTX 1.7 on CPU, peak RSS 2.1x the weights
    instead of 3.1x (FP16, 2.84 GB of weights). Builders without it return the whole buffer.
    Written to a temporary name and renamed, so a killed build never leaves a plan that looks whole.
    """
    tmp = out_path.with_name(out_path.name + ".partial")
    digest = hashlib.sha256()
    size = 0
    with open(tmp, "wb") as f:
        if hasattr(builder, "build_serialized_network_to_stream") and hasattr(trt, "IStreamWriter"):
            class Writer(trt.IStreamWriter):  # type: ignore[misc,name-defined]
                def write(self, data: Any) -> int:
                    nonlocal size
                    view = memoryview(data)
                    f.write(view)
                    digest.update(view)
                    size += view.nbytes
                    return view.nbytes

            writer = Writer()
            ok = builder.build_serialized_network_to_stream(network, config, writer)
        else:
            plan = builder.build_serialized_network(network, config)
            ok = plan is not None
            if ok:
                view = memoryview(plan)
                f.write(view)
                digest.update(view)
                size = view.nbytes
    if not ok or size == 0:
        tmp.unlink(missing_ok=True)
        return None
    tmp.replace(out_path)
    return size, digest.hexdigest()


def graph_quant_dtypes(onnx_path: Path) -> set[str]:
    """Low-precision types the graph's Q/DQ use ({"int8", "fp8", "int4"}), read without weights."""
    import onnx

    m = onnx.load(str(onnx_path), load_external_data=False)
    types = {i.name: i.data_type for i in m.graph.initializer}
    out: set[str] = set()
    for n in m.graph.node:
        if n.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        # the zero point's dtype, the Q's output_dtype attribute, or the quantized weight itself
        cands = [types.get(x) for x in n.input[:1] + n.input[2:3]]
        cands += [a.i for a in n.attribute if a.name == "output_dtype"]
        out |= {ONNX_LOW_PRECISION[c] for c in cands if c in ONNX_LOW_PRECISION}
    return out


def refuse_unsupported(graph: str, precision: str, quant: set[str], target: dict[str, Any]) -> None:
    """Refuse, before any build, a precision the target's hardware does not have."""
    from pipeline.targets import load_catalog, precision_refusal, with_fp8

    name, sm = target["name"], target["sm"]
    have = tuple(target.get("precisions", ()))
    if precision == "fp8" or "fp8" in quant:
        why = precision_refusal(name, sm, have, "fp8")
        if why:
            raise StageError(f"{graph}: {why} (the graph {'asks for fp8' if precision == 'fp8' else 'holds FP8 Q/DQ'}); "
                             f"targets with FP8: {', '.join(with_fp8(load_catalog()))}")
    why = None if precision == "fp16" else precision_refusal(name, sm, have, precision)  # FP16 builds anywhere
    if not why and "int8" in quant:  # INT8 Q/DQ in the graph: the hardware rule alone
        why = precision_refusal(name, sm, (*have, "int8"), "int8")
    if why:
        raise StageError(f"{graph}: {why}")
