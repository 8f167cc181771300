"""ORT equality of a graph before and after fusion: the figure every rule is judged by.

Sessions run with ``ORT_DISABLE_ALL`` so the comparison sees our rewrite, not ORT's own
fusions (which would also hide a rewrite that only ORT's optimizer happens to repair).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from stages.lib.dtypes import ONNX_NUMPY

if TYPE_CHECKING:
    import numpy as np
    import onnx


def ort_run(model: onnx.ModelProto | bytes | str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """The graph's outputs in order. A file runs block by block (``stages.lib.segments.runner``: a
    whole-graph session of a big FP16 decoder holds ~2x its weights; fuse checks two graphs),
    so before and after are both rounded at the same residual cuts; in-memory models whole."""
    import onnx

    from stages.lib.ortsession import ort_session

    if isinstance(model, str):
        from pathlib import Path

        from stages.lib.segments import runner as segments

        return list(segments.run_whole(Path(model), feeds).values())

    if isinstance(model, onnx.ModelProto):
        from stages.lib.qdq.graphio import spilled
        from stages.lib.qdq.model_tensors import fits_in_proto

        if not fits_in_proto(model):  # past protobuf's 2 GB: from a temporary copy with external data
            with spilled(model) as path:
                return ort_run(str(path), feeds)
        model = model.SerializeToString()
    sess = ort_session(model, optimization="none")  # the module's ORT_DISABLE_ALL
    return list(sess.run(None, feeds))


def random_feeds(
    model: onnx.ModelProto, dims: dict[str, int] | None = None, seed: int = 0, default_dim: int = 4
) -> dict[str, np.ndarray]:
    """Random inputs from the graph's declared input types. Symbolic dims take ``dims[name]``
    (else ``default_dim``); integer inputs get small non-negative values, bool inputs True."""
    import numpy as np

    rng = np.random.default_rng(seed)
    dims = dims or {}
    inits = {i.name for i in model.graph.initializer}
    feeds: dict[str, np.ndarray] = {}
    for inp in model.graph.input:
        if inp.name in inits:
            continue
        tt = inp.type.tensor_type
        shape = [
            d.dim_value if d.HasField("dim_value") else dims.get(d.dim_param, default_dim)
            for d in tt.shape.dim
        ]
        dtype = ONNX_NUMPY.get(tt.elem_type)
        if dtype is None:
            raise ValueError(f"input {inp.name}: element type {tt.elem_type} not supported here")
        if dtype.startswith("float"):
            feeds[inp.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype == "bool":
            feeds[inp.name] = np.ones(shape, dtype=bool)
        else:
            feeds[inp.name] = rng.integers(0, 4, size=shape).astype(dtype)
    return feeds


def compare(
    before: onnx.ModelProto | bytes | str, after: onnx.ModelProto | bytes | str, feeds: dict[str, np.ndarray]
) -> dict[str, Any]:
    """{"max_abs": worst |after − before| over all outputs, "ref_max": max |before|,
    "per_output": [...]} computed in float64 from outputs in the graph's own dtype."""
    import numpy as np

    ref, out = ort_run(before, feeds), ort_run(after, feeds)
    if len(ref) != len(out):
        raise ValueError(f"output count changed: {len(ref)} -> {len(out)}")
    per: list[dict[str, Any]] = []
    for r, o in zip(ref, out, strict=True):
        if r.shape != o.shape:
            raise ValueError(f"output shape changed: {r.shape} -> {o.shape}")
        r64, o64 = r.astype(np.float64), o.astype(np.float64)
        both_nan = np.isnan(r64) & np.isnan(o64)
        diff = np.where(both_nan, 0.0, np.abs(o64 - r64))
        per.append({"max_abs": float(np.nan_to_num(diff, nan=np.inf).max(initial=0.0)),
                    "ref_max": float(np.nanmax(np.abs(r64), initial=0.0)), "dtype": str(r.dtype)})
    return {
        "max_abs": max((p["max_abs"] for p in per), default=0.0),
        "ref_max": max((p["ref_max"] for p in per), default=0.0),
        "per_output": per,
    }
