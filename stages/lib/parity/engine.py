"""Engine-level parity: run a built engine on held-out inputs and compare with the reference.

Only possible on a GPU host with the builder's runtime (`deserialize_cuda_engine` needs a GPU;
TensorRT-RTX engines also need a GPU of the SM they were compiled for, and RTX has no Hopper).
Everywhere else the result is `not run: <why>`: reported, never counted as passed.

Held-out data: `<graph>.heldout.npz` in the engine's input folder, arrays `in.<input name>`
and `ref.<output name>` (the reference outputs, e.g. from PyTorch).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from stages.lib.parity.metrics import compare, worst
from stages.lib.trt.backend import Backend, local_gpu_sms


def heldout_path(folder: Path, graph: str) -> Path:
    return folder / f"{graph}.heldout.npz"


def why_not(backend: Backend, sm: str, heldout: Path) -> str | None:
    """The reason parity cannot run here, or None when it can."""
    sms = local_gpu_sms()
    if not sms:
        return "no CUDA GPU on this host (TensorRT engines cannot execute on CPU)"
    if sm not in sms:
        return f"the engine is for SM {sm}; this host's GPUs are SM {', '.join(sms)}"
    if not heldout.is_file():
        return f"no held-out inputs ({heldout.name}) in the input folder"
    try:
        import torch
    except ImportError:
        return "torch is not installed (it holds the device buffers)"
    if not torch.cuda.is_available():
        return "torch has no CUDA (a CPU build of torch cannot hold device buffers)"
    return None


def run_parity(backend: Backend, engine_path: Path, heldout: Path) -> dict[str, Any]:
    """Deserialize, run once per held-out sample set, and compare every output (worst case)."""
    import numpy as np
    import torch

    from stages.lib.trt.backend import make_logger

    trt = backend.trt
    log: list[str] = []
    runtime = trt.Runtime(make_logger(trt, log, verbose=False))
    engine = runtime.deserialize_cuda_engine(engine_path.read_bytes())
    if engine is None:
        raise RuntimeError(f"could not deserialize {engine_path.name}: {log[-1] if log else 'no detail'}")
    ctx = engine.create_execution_context()
    data = np.load(heldout)
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    keep: dict[str, Any] = {}
    for n in names:
        if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT:
            t = torch.from_numpy(np.ascontiguousarray(data[f"in.{n}"])).cuda()
            ctx.set_input_shape(n, tuple(t.shape))
            keep[n] = t
    for n in names:
        if engine.get_tensor_mode(n) != trt.TensorIOMode.INPUT:
            dt = torch.from_numpy(np.zeros(0, dtype=trt.nptype(engine.get_tensor_dtype(n)))).dtype
            keep[n] = torch.empty(tuple(ctx.get_tensor_shape(n)), dtype=dt, device="cuda")
    for n, t in keep.items():
        ctx.set_tensor_address(n, t.data_ptr())
    stream = torch.cuda.Stream()
    if not ctx.execute_async_v3(stream.cuda_stream):
        raise RuntimeError(f"{engine_path.name}: execution failed")
    stream.synchronize()
    per = {}
    for n in names:
        if f"ref.{n}" in data.files:
            per[n] = compare(keep[n].float().cpu().numpy(), data[f"ref.{n}"])
    if not per:
        raise RuntimeError(f"{heldout.name} has no ref.<output> arrays matching the engine's outputs")
    return {"outputs": {n: p.as_dict() for n, p in per.items()}, "worst": worst(list(per.values())).as_dict()}
