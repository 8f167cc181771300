"""The reference stage's folder format, read and written here only (the stage, quantize,
verify, the package writer and the device runtime's probe set all use this module).

- ``reference.npz``: every held-out sample's arrays, keyed ``s<i>.<name>`` (``image``,
  ``pixel_values``, ``vision_features``, ``logits``, ``generated``, ``deepstack.<k>`` ...);
- ``reference.json``: {"family", "vision_only", "samples": [per-sample facts], "dtype", ...}.

numpy only: the device runtime reads a package's probe set (the same npz) with it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

NPZ, META = "reference.npz", "reference.json"


def save_reference(folder: Path, samples: Sequence[Mapping[str, np.ndarray]], meta: dict[str, Any]) -> None:
    arrays = {f"s{i}.{k}": v for i, s in enumerate(samples) for k, v in s.items()}
    savez: Any = np.savez  # numpy's stubs type **kwargs as its allow_pickle flag
    savez(folder / NPZ, **arrays)
    (folder / META).write_text(json.dumps(meta, indent=2))


def load_samples(npz: Path, n_samples: int | None = None) -> list[dict[str, np.ndarray]]:
    """One dict of arrays per sample from a reference.npz (or a package's probe.npz)."""
    samples: dict[int, dict[str, np.ndarray]] = {}
    with np.load(npz, allow_pickle=False) as z:
        for key in z.files:
            idx, name = key.split(".", 1)
            samples.setdefault(int(idx[1:]), {})[name] = z[key]
    n = max(samples, default=-1) + 1 if n_samples is None else n_samples
    return [samples.get(i, {}) for i in range(n)]


def load_reference(folder: str | Path) -> tuple[dict[str, Any], list[dict[str, np.ndarray]]]:
    """(reference.json, one dict of arrays per sample) from a reference stage's folder."""
    folder = Path(folder)
    meta = json.loads((folder / META).read_text())
    return meta, load_samples(folder / NPZ, len(meta["samples"]))
