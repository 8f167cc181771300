"""A real trained detector through bring-your-own ONNX: PaddleOCR's PP-OCRv4 text detector (a DB
CNN, opset 12, as RapidOCR ships it), calibrated on rendered document pages and graded on
held-out pages plus a real scan (scikit-image's ``page.png``), dynamic 320..960 with its aspect
kept. FP8 passes the default gates with the default search choosing what stays high, more than
60 % of its convolutions in FP8 (ModelOpt's best configuration on this detector left 40 % high),
and the engine's profile spans the declared sizes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import Cli
from tests.real_models import PAGE_SCAN, PPOCR_DET, render_page

CONFIG = """
name: det
model:
  vision_onnx: {{path: {model}, input_name: x, layout: NCHW, fit: keep-aspect, stride: 32,
                mean: [0.485, 0.456, 0.406], std: [0.229, 0.224, 0.225]}}
targets: [rtx4090]
precision: {{vision: fp8}}
calibration: {{source: folder, images: cal, samples: 4}}
verify: {{images: held, samples: 3}}
profiles: {{vision: {{min_image: [320, 320], opt_image: [640, 640], max_image: [960, 960], max_images: 1}}}}
engine: {{workspace_mb: 256}}
"""


@pytest.mark.slow
def test_a_real_detector_passes_the_default_fp8_gates_on_real_pages(
        tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    import shutil

    import stages

    real = tmp_path_factory.mktemp("real_files")
    model = PPOCR_DET.fetch(real)
    for i in range(4):
        render_page(tmp_path / "cal" / f"doc{i}.png", seed=i)
    for i in range(2):
        render_page(tmp_path / "held" / f"page{i}.png", seed=100 + i)
    shutil.copyfile(PAGE_SCAN.fetch(real), tmp_path / "held" / "scan.png")
    cli = Cli(tmp_path, stages=",".join(stages.STAGE_MODULES))
    cfg = cli.config(CONFIG.format(model=model), name="det.yaml")
    r = cli("build", str(cfg), "--json", check=None, timeout=1500)
    report = json.loads(r.stdout)
    out = tmp_path / "artifacts" / "out" / "det"
    assert report["result"] == "ok", [(n["id"], n["status"], n.get("note")) for n in report["nodes"]]
    v = json.loads((out / "verify@rtx4090" / "verify.json").read_text())
    row = next(r for r in v["rows"] if r["runtime"] == "onnxruntime")
    assert row["status"] == "pass" and v["reference"]["held_out"].endswith("held")
    assert sorted(v["reference"]["images"]) == ["page0.png", "page1.png", "scan.png"]
    assert row["figures"]["cosine"] >= 0.984  # ModelOpt's best on this detector
    q = json.loads((out / "quantize@rtx4090" / "quantize.json").read_text())["vision"]
    assert q["kept_high_precision"], "the search chose what stays high"
    side = json.loads((out / "engine@rtx4090" / "vision.engine.json").read_text())
    assert side["layers"]["low_precision_share"] > 0.6
    assert side["profile"]["x"] == {"min": [1, 3, 320, 320], "opt": [1, 3, 640, 640], "max": [1, 3, 960, 960]}
