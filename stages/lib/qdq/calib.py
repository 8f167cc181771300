"""What calibration measured for one graph, as the quantizers read it (``ranges_<graph>.json``
and its ``.npz``, written by the calibrate stage's collectors in ``qdq.calibrators``)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["Calib"]


@dataclass
class Calib:
    """What calibration measured for one graph (read from ranges_<graph>.json + .npz)."""

    amax: dict[str, float] = field(default_factory=dict)  # int8-grid clip per tensor
    amax_fp8: dict[str, float] = field(default_factory=dict)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    chan_ms: dict[str, np.ndarray] = field(default_factory=dict)  # E[x_k^2] per input channel
    chan_amax: dict[str, np.ndarray] = field(default_factory=dict)  # max |x_k| per input channel
    chan_amax_halves: dict[str, np.ndarray] = field(default_factory=dict)  # [2, K]: even / odd samples

    @classmethod
    def from_ranges(cls, ranges: Mapping[str, Any], arrays: Mapping[str, np.ndarray] | None = None) -> Calib:
        t = ranges["tensors"]
        c = cls(
            amax={n: float(r["amax"]) for n, r in t.items()},
            amax_fp8={n: float(r.get("amax_fp8", r["amax"])) for n, r in t.items()},
            shapes={n: tuple(r["shape"]) for n, r in t.items()},
        )
        for i, n in enumerate(ranges.get("order", [])):
            if arrays is not None and f"chan_ms_{i}" in arrays:
                c.chan_ms[n] = np.asarray(arrays[f"chan_ms_{i}"])
            if arrays is not None and f"chan_amax_{i}" in arrays:
                c.chan_amax[n] = np.asarray(arrays[f"chan_amax_{i}"])
            if arrays is not None and f"chan_amax_halves_{i}" in arrays:
                c.chan_amax_halves[n] = np.asarray(arrays[f"chan_amax_halves_{i}"])
        return c

    @classmethod
    def load(cls, json_path: Path) -> Calib:
        ranges = json.loads(json_path.read_text())
        npz = json_path.with_suffix(".npz")
        arrays = dict(np.load(npz)) if npz.is_file() else None
        return cls.from_ranges(ranges, arrays)
