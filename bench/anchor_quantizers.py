"""The other tools' quantizers, as their users run them, for ``bench/anchors.py``: onnxruntime's
``quantize_static`` and NVIDIA ModelOpt's ONNX PTQ CLI, each on its own writable copy of the
fused graph (ModelOpt rewrites its ``--onnx_path`` in place), with the same calibration feeds.

ModelOpt gets its own virtualenv: its [onnx] extra pulls onnxruntime-gpu, cupy and an older onnx
over the project's CPU stack. It is called through subprocess when /work/modelopt-venv/bin/python
exists. Install it like this (torch is a hard import: pin the CPU build, torch==2.13.0, which
installs from a local file here; an unpinned torch pulls ~5 GB of CUDA wheels):

    python -m venv /work/modelopt-venv
    /work/modelopt-venv/bin/pip install torch==2.13.0
    /work/modelopt-venv/bin/pip install --no-deps nvidia-modelopt==0.47.0
    /work/modelopt-venv/bin/pip install numpy onnx onnxruntime onnx-graphsurgeon ml_dtypes tqdm \
        nvidia-ml-py onnxslim onnxscript lief pyyaml
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

# stage -> seconds, summed over a bench run (both benches print it)
SECONDS: dict[str, float] = {}


@contextlib.contextmanager
def timed(stage: str) -> Iterator[None]:
    t = time.perf_counter()
    try:
        yield
    finally:
        SECONDS[stage] = SECONDS.get(stage, 0.0) + time.perf_counter() - t

MODELOPT_PY = Path("/work/modelopt-venv/bin/python")
Feeds = list[dict[str, Any]]

def first_line(e: BaseException | str) -> str:
    return (str(e).strip() or type(e).__name__).splitlines()[0][:300]


def copy_graph(src: Path, folder: Path) -> Path:
    """``src`` and the ``.data`` file it names, copied into ``folder`` as writable files."""
    folder.mkdir(parents=True, exist_ok=True)
    for f in (src, src.with_name(src.name + ".data")):
        if f.is_file():
            shutil.copy2(f, folder / f.name)
            (folder / f.name).chmod(0o644)
    return folder / src.name


def to_fp32(src: Path, dst: Path) -> Path:
    """An FP32 copy, with every FP16 initializer, Constant, Cast and value type widened. It is
    written inline, which is fine for a tiny-model bench."""
    import onnx
    from onnx import TensorProto, numpy_helper

    m, wide = onnx.load(str(src)), {TensorProto.FLOAT16: TensorProto.FLOAT}

    def widen(t: onnx.TensorProto) -> onnx.TensorProto:
        ok = t.data_type != TensorProto.FLOAT16
        return t if ok else numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float32), t.name)

    for t in m.graph.initializer:
        t.CopyFrom(widen(t))
    for a in (a for n in m.graph.node for a in n.attribute):
        if a.type == onnx.AttributeProto.TENSOR:
            a.t.CopyFrom(widen(a.t))
        elif a.name == "to":  # Cast
            a.i = wide.get(a.i, a.i)
    for v in (*m.graph.input, *m.graph.output, *m.graph.value_info):
        v.type.tensor_type.elem_type = wide.get(v.type.tensor_type.elem_type, v.type.tensor_type.elem_type)
    dst.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(m, str(dst))
    return dst


def ort_static(src: Path, feeds: Feeds, mode: str, dst: Path, gemms: bool) -> dict[str, Any]:
    """quantize_static, QDQ. ``gemms`` puts Q/DQ on Conv/Gemm/MatMul only (TensorRT's placement,
    FIELD_NOTES §2.2); otherwise ORT's default op set is used, with Add, Mul, Softmax and more."""
    import onnxruntime.quantization as Q

    from stages.lib.qdq.calibset import cast_feed
    from stages.lib.segments.runner import graph_inputs

    # FP32 copy: on an FP16 graph quantize_static puts FP32 scales onto FP16 tensors, and ORT rejects
    # the result ("Type parameter (T1) of Optype (QuantizeLinear) bound to different types")
    model = to_fp32(src, dst.parent / "fp32" / src.name)
    specs = graph_inputs(model)

    class Reader(Q.CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter([cast_feed(specs, f) for f in feeds])

        def get_next(self) -> dict[str, Any] | None:
            return next(self.it, None)

    qt = Q.QuantType.QInt8 if mode == "int8" else Q.QuantType.QFLOAT8E4M3FN
    kw: dict[str, Any] = {"quant_format": Q.QuantFormat.QDQ, "per_channel": True, "activation_type": qt,
                          "weight_type": qt, "op_types_to_quantize": ["Conv", "Gemm", "MatMul"] if gemms else None,
                          "extra_options": {"ActivationSymmetric": True, "WeightSymmetric": True}}
    info = {"note": "quantized from an FP32 copy (the engine's unquantized layers run FP32)"}
    with contextlib.redirect_stdout(sys.stderr):  # its calibrators print progress: keep stdout the table's
        try:
            Q.quantize_static(str(model), str(dst), Reader(), calibrate_method=Q.CalibrationMethod.MinMax, **kw)
        except ValueError as e:  # FP8: "Only Distribution calibration method is supported for float quantization."
            if mode != "fp8":
                raise
            info["note"] = f"MinMax refused ({first_line(e)}): Distribution calibration, FP32 copy"
            try:
                Q.quantize_static(str(model), str(dst), Reader(), calibrate_method=Q.CalibrationMethod.Distribution, **kw)
            except ValueError as e2:
                raise ValueError(f"MinMax refused for FP8; Distribution: {first_line(e2)} (its histogram of the "
                                 "attention mask's -FLT_MAX fill overflows)") from None
    return info


def modelopt(src: Path, feeds: Feeds, mode: str, dst: Path) -> dict[str, Any]:
    """ModelOpt's ONNX PTQ CLI, run on a copy. Its calibration data has each input stacked along
    axis 0, and one step's shapes go in --calibration_shapes."""
    if not MODELOPT_PY.is_file():
        raise RuntimeError(f"ModelOpt: not installed ({MODELOPT_PY}; how to install: bench/anchor_quantizers.py docstring)")
    model, data = copy_graph(src, dst.parent / "src"), dst.parent / "calib.npz"
    stacked: dict[str, Any] = {k: np.concatenate([f[k] for f in feeds], 0) for k in feeds[0]}
    np.savez(data, **stacked)
    shapes = ",".join(f"{k}:{'x'.join(map(str, v.shape))}" for k, v in feeds[0].items())
    cmd = [str(MODELOPT_PY), "-m", "modelopt.onnx.quantization", "--onnx_path", str(model), "--quantize_mode", mode,
           "--calibration_data_path", str(data), "--calibration_shapes", shapes, "--calibration_method", "max",
           "--calibration_eps", "cpu", "--output_path", str(dst)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=dst.parent)
    if p.returncode != 0 or not dst.is_file():
        lines = [ln for ln in p.stderr.splitlines() if "rror" in ln] or p.stderr.splitlines() or ["?"]
        raise RuntimeError(f"ModelOpt exit {p.returncode}: {lines[-1].strip()}")
    version = [str(MODELOPT_PY), "-c", "import modelopt; print(modelopt.__version__)"]
    return {"version": subprocess.run(version, capture_output=True, text=True).stdout.strip()}
