"""The real package the runtime tests run on (tests/test_runtime_check.py, test_runtime_engine.py,
test_runtime_generate.py, test_runtime_venv.py): the package stage's own ``assemble`` over the
real stages' outputs for the tiny default (checkpoint, reference, export_vision, export_decoder,
engine built with TensorRT-RTX for rtx4090, all FP16), built once per test session; a photo to
prompt it with; and the runtime's CLI in a subprocess.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
TARGET = "rtx4090"
CONFIG: dict[str, Any] = {"name": "rt", "model": {"generate": "tiny", "family": "qwen2_5_vl"}, "targets": [TARGET],
                          "precision": {"vision": "fp16", "decoder": "fp16"}, "engine": {"timing_cache": False}}
CHAIN = ("checkpoint", "reference", "export_vision", "export_decoder")
PROMPT = "describe the picture"


def _stage(name: str, cfg: Any, inputs: dict[str, Path], out: Path) -> None:
    from pipeline.stage import StageContext
    from pipeline.targets import load_catalog

    st = importlib.import_module(f"stages.{name}").STAGE
    t = load_catalog()[TARGET] if st.per_target else None
    out.mkdir(parents=True)
    st.run(StageContext(node_id=name, params=st.params(cfg, t), inputs={d: inputs[d] for d in st.deps}, out=out,
                        target=t.model_dump() if t else None, external=[]))


def build_package(root: Path) -> Path:
    """The FP16 package of the tiny default (``package.tar``), from the real stages' outputs."""
    from pipeline.config import BuildConfig
    from stages.lib.packaging import BuildFolders, assemble

    cfg = BuildConfig.model_validate(CONFIG)
    f: dict[str, Path] = {}
    for name in CHAIN:
        f[name] = root / name
        _stage(name, cfg, f, f[name])
    # an FP16 "quantize" folder: the exported graphs as they are, marked fp16 (what quantize@T
    # writes for precision fp16), so the engines and the package are the FP16 build's
    q = root / "quantize"
    q.mkdir()
    for src, names in ((f["export_vision"], ("vision.onnx", "vision.json")),
                       (f["export_decoder"], ("decoder.onnx", "embed.onnx", "decoder.json"))):
        for n in names:
            shutil.copy(src / n, q / n)
    (q / "quantize.json").write_text(json.dumps({g: {"precision": "fp16"} for g in ("vision", "decoder", "embed")}))
    f["quantize"] = q
    _stage("engine", cfg, f, root / "engine")
    out = root / "package"
    out.mkdir()
    gates = {k: g.model_dump(mode="json") for k, g in cfg.gates.items()}
    res = assemble(out, BuildFolders(engine=root / "engine", quantize=q, checkpoint=f["checkpoint"],
                                     reference=f["reference"]), name="rt", gates=gates)
    (root / "done").write_text(str(res.tar))
    return res.tar


def shared_package(factory: pytest.TempPathFactory) -> Path:
    """One package per pytest session (the test_runtime_* modules and test_runtime_venv.py share it)."""
    root = factory.getbasetemp() / "runtime_package"
    if (root / "done").is_file():
        return Path((root / "done").read_text())
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir()
    return build_package(root)


def model_path(tar: Path) -> Path:
    return tar.parent.parent / "checkpoint" / "model"


def photo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic photo, 150 x 190 (one per module that asks for it)."""
    from PIL import Image

    from stages.lib.hostside.vision import synthetic_image

    p = tmp_path_factory.mktemp("img") / "photo.png"
    Image.fromarray(synthetic_image(150, 190, 7)).save(p)  # not a multiple of 28: the resize runs
    return p


def cli(*args: str, cwd: Path | None = None, python: str = sys.executable) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)} if python == sys.executable else dict(os.environ)
    return subprocess.run([python, "-m", "stages.lib.runtime.cli", *args], cwd=cwd or REPO, env=env,
                          capture_output=True, text=True, timeout=300)
