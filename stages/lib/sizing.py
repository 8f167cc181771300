"""What a node of each stage needs from the machine that runs it, from sizes on disk alone.

A farm places nodes by these figures (``pipeline.farm``), so Ray never packs two 17 GB exports
on one 24 GB worker, and ``vlmforge plan --json`` hands them to any other scheduler. Memory is
``floor + ratio x weight bytes``: the ratios are the peaks bench/scale.py measured at full
size (the larger of Qwen2.5-VL-7B and Qwen3-VL-8B, 15.45 / 16.33 GiB of BF16 weights), with
10 % headroom; the floor covers a node of the tiny default model (at most 0.5 GiB measured: the imports).
Full-TensorRT targets need a GPU of their SM: a custom resource ``sm_<NN>`` that GPU workers
advertise (``ray start --resources '{"sm_90": 1}'``). TensorRT-RTX compiles on any CPU worker.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.resources import GiB, NodeResources
from pipeline.targets import sm_int

if TYPE_CHECKING:
    from pipeline.config import BuildConfig
    from pipeline.targets import TargetSpec

FLOOR_BYTES = int(0.75 * GiB)
MEASURED_AT = "bench/scale.py peaks at 7-8 B"

# peak RSS / checkpoint weight bytes, per stage (stop 22-23 tables: 7 B / 8 B)
RATIOS = {
    "checkpoint": 0.10,  # headers and hashes; the tiny model is generated here
    "export_vision": 0.25,  # 0.22 / 0.19
    "export_decoder": 0.75,  # 0.69 / 0.64
    "fuse": 0.45,  # 0.28 / 0.39
    "calibrate": 0.65,  # 0.57 / 0.53
    "reference": 1.00,  # 0.89 / 0.81: the whole checkpoint in torch
    "quantize": 0.40,  # 0.34 / 0.35
    "engine": 1.55,  # 1.43 / 1.35: the TensorRT-RTX builder (VmHWM; about half is the mapped graph)
    "verify": 0.35,  # 0.30 / 0.32
    "package": 0.05,  # streams files into the archive
}


def weight_bytes(cfg: BuildConfig) -> int:
    """The model's weight bytes on disk: the checkpoint's safetensors, or a bring-your-own
    graph with its external data. 0 for a generated model (it does not exist yet, and is tiny)."""
    m = cfg.model
    total = 0
    if m.checkpoint is not None:
        total += sum(p.stat().st_size for p in Path(m.checkpoint).glob("*.safetensors") if p.is_file())
    if m.vision_onnx is not None:
        graph = Path(m.vision_onnx.path)
        total += graph.stat().st_size
        total += sum(p.stat().st_size for p in graph.parent.glob(graph.name + "*.data") if p.is_file())
    return total


def gpu_resource(target: TargetSpec | None) -> tuple[tuple[str, float], ...]:
    """The GPU a full-TensorRT target's node must run on, as a worker's custom resource."""
    if target is None or target.builder != "tensorrt":
        return ()
    return ((f"sm_{sm_int(target.sm)}", 1.0),)


def node_resources(stage: str, *, gpu: bool = False) -> Callable[[BuildConfig, TargetSpec | None], NodeResources]:
    """The ``Stage.resources`` of ``stage``: its memory estimate and, with ``gpu``, the target's GPU."""
    ratio = RATIOS[stage]

    def resources(cfg: BuildConfig, target: TargetSpec | None) -> NodeResources:
        w = weight_bytes(cfg)
        basis = f"{ratio:g} x {w / GiB:.2f} GiB of weights + {FLOOR_BYTES / GiB:g} GiB ({MEASURED_AT})"
        return NodeResources(cpus=1.0, memory_bytes=FLOOR_BYTES + int(ratio * w),
                             custom=gpu_resource(target) if gpu else (), basis=basis)

    return resources
