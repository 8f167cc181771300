"""Issue 12: activation outlier channels (what trained LLMs have and random ones do not) break
per-tensor INT8 activations; the quantize stage tries SmoothQuant and keeps it where the graph
measures better with it. The decoder gets injected outliers without changing its float function
(``bench/outliers.py``: a few norm-gamma channels x20-60, the matching weight rows / the same),
then runs through the real calibrate and quantize stages with default settings."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from pipeline.config import BuildConfig
from pipeline.targets import load_catalog
from tests.qdq_stage_fixtures import run_stage

REPO = Path(__file__).resolve().parent.parent


def _bench_outliers() -> Any:
    spec = importlib.util.spec_from_file_location("bench_outliers", REPO / "bench" / "outliers.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_the_default_int8_build_smooths_injected_outliers(tmp_path: Path) -> None:
    cfg = BuildConfig.model_validate({"name": "o", "model": {"generate": "tiny", "family": "qwen2_5_vl"},
                                      "targets": ["rtx3090"]})
    work = tmp_path / "w"

    def stage(name: str, target: Any = None) -> Any:
        return run_stage(work, cfg, name, target)

    for name in ("checkpoint", "export_vision", "export_decoder", "fuse", "reference"):
        stage(name)
    fused = work / "fuse" / "decoder.onnx"
    injected = _bench_outliers().inject(fused, tmp_path / "decoder.onnx", channels=4, lo=20.0, hi=60.0)
    assert len(injected) >= 4  # every input / post-attention norm of the tiny decoder's layers
    shutil.move(tmp_path / "decoder.onnx", fused)
    stage("calibrate")
    res = stage("quantize", load_catalog()["rtx3090"])
    q = json.loads((work / "quantize@rtx3090" / "quantize.json").read_text())["decoder"]
    sq = q["smoothquant"]
    assert q["precision"] == "int8" and sq["chosen"] == "smooth", sq
    assert sq["smooth"] > sq["plain"] + 0.05  # on calibration: the outliers wreck per-tensor INT8 without it
    smoothed = [a for a, g in sq["groups"].items() if g["alpha"] is not None]
    assert set(injected) <= set(smoothed), (sorted(injected), smoothed)
    held = q["parity"]["vs_unquantized"]
    assert held["cosine"] > 0.99 and res.metrics["decoder"]["kept"] == 0, held  # no fallback needed
