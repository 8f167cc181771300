"""Bring-your-own graphs at an old opset: upgraded where they enter, never failing three stages later.

Fuse, calibrate and quantize are written against opset 19 (FP8 QuantizeLinear needs 19;
Squeeze/Unsqueeze/ReduceMean take their axes as inputs from 13/18). A user's graph below that
is converted with the onnx version converter when it is imported (export_vision), and the
converted graph is proven to compute what the original computes on the stage's check image;
the reference stage keeps running the user's original file. A graph the converter cannot
upgrade is refused there, in one line naming the file and the op.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.stage import StageError

TARGET_OPSET = 19
PROTO_LIMIT = 2 << 30  # the converter works on one in-memory proto


def default_opset(model: Any) -> int:
    return max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)


def upgrade(src: Path, dst: Path) -> int | None:
    """Write ``src`` upgraded to ``TARGET_OPSET`` at ``dst`` and return its old opset; None (and
    nothing written) when it is recent enough already."""
    import onnx
    from onnx import version_converter

    head = onnx.load(str(src), load_external_data=False)
    old = default_opset(head)
    if old >= TARGET_OPSET:
        return None
    size = src.stat().st_size + sum(p.stat().st_size for p in src.parent.glob(src.name + "*.data"))
    if size > PROTO_LIMIT:
        raise StageError(f"{src}: opset {old} and {size / 2**30:.1f} GiB: too large for the onnx version converter; "
                         f"re-export it at opset >= {TARGET_OPSET}")
    try:
        up = version_converter.convert_version(onnx.load(str(src)), TARGET_OPSET)
        onnx.checker.check_model(up)
    except Exception as e:  # noqa: BLE001 - the converter raises many kinds; each is one line to the user
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise StageError(f"{src}: opset {old} could not be upgraded to {TARGET_OPSET} by the onnx version converter "
                         f"({first}); re-export it at opset >= {TARGET_OPSET}") from None
    onnx.save(up, str(dst))
    return old
