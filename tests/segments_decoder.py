"""The tiny default's decoder as the segment runner gets it, for tests/test_segments_runner.py,
test_segments_calibration.py and test_verify_streaming.py: ``_export`` writes it as
export_decoder does (no parity run), fused, with its cuts; ``tiny_decoder`` exports the FP16 one
once per pytest session.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from stages.lib.segments.cuts import read_cuts
from tests import qdq_stage_fixtures as F


def _export(ckpt: Path, out: Path, dtype: str) -> Path:
    """The tiny checkpoint's decoder as export_decoder writes it (no parity run), fused."""
    import onnx_ir as ir

    from stages.fuse import fuse_graph
    from stages.lib.checkpoints.local import resolve_checkpoint
    from stages.lib.export import decoder as dx
    from stages.lib.export import decoder_graph as dg
    from stages.lib.export.decoder_load import load_decoder
    from stages.lib.segments.cuts import cuts_from_name_scopes, write_cuts

    path, family = resolve_checkpoint(ckpt)
    model = load_decoder(path, dtype=dtype)
    raw = out / "export"
    raw.mkdir(parents=True)
    facts = dx.export_decoder_graph(model, family, 0, raw / "decoder.onnx", dtype, 19,
                                    {"batch": 2, "seq": 8, "past": 4})
    dg.finalize_graph(raw / "decoder.onnx", facts["layers"], 0)
    dx.export_embed_graph(dx.embed_table(model), out / "embed.onnx", 19)
    m = ir.load(raw / "decoder.onnx")
    if not read_cuts(m):  # older exporters do not record them: derive them as the runner would
        write_cuts(m, cuts_from_name_scopes(m))
        ir.save(m, raw / "decoder.onnx")
    params = {"fold_batchnorm": True, "attention": "auto", "cleanup": True, "opset": 19}
    fuse_graph(raw / "decoder.onnx", out / "decoder.onnx", params, {}, 0)
    return out / "decoder.onnx"


def tiny_decoder(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The tiny checkpoint and its FP16 decoder, exported and fused (two layers, so three
    segments), under ``root``: one per pytest session (the runner's and the calibration's tests
    share it)."""
    root = tmp_path_factory.getbasetemp() / "segments_tiny"
    if not (root / "done").is_file():
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir()
        _export(F.checkpoint(root), root / "fp16", "fp16")
        (root / "done").write_text("")
    return {"root": root, "ckpt": root / "checkpoint", "fp16": root / "fp16" / "decoder.onnx"}
