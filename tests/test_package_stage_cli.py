"""package@T through the real CLI (slow): the tiny default built for one target with
``--until package``, and what a device gets: the delivered tar, runtime.json against the ONNX
graphs, the probe set through onnx/ under the package's own gates, and a second build that runs
nothing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pipeline.config import BuildConfig
from stages.lib.packaging import check_archive, load_probe
from stages.lib.runtime.archive import extract  # the one safe extractor (the device side)
from stages.package import STAGE
from tests.conftest import Cli
from tests.package_folders import GRAPHS, TARGET, _names, _run

# --- the real stages, through the CLI, on the tiny default (slow) -------------------------------

REAL = ("stages.checkpoint,stages.export_vision,stages.export_decoder,stages.fuse,stages.calibrate,"
        "stages.reference,stages.quantize,stages.engine,stages.verify,stages.package")
DEFAULT_YAML = f"""
name: pk
model: {{generate: tiny, family: qwen2_5_vl, seed: 0}}
targets: [{TARGET}]
"""


@pytest.fixture(scope="module")
def real(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    cli = Cli(tmp_path_factory.mktemp("pkg-cli"), stages=REAL)
    cfg = cli.config(DEFAULT_YAML, "pk.yaml")
    doc = cli.json("build", str(cfg), "--until", "package", "-j", "1")
    return {"cli": cli, "cfg": cfg, "doc": doc, "out": cli.tmp / "artifacts" / "out" / "pk"}


@pytest.mark.slow
def test_cli_builds_delivers_and_caches_the_package(real: dict[str, Any]) -> None:
    cli, doc = real["cli"], real["doc"]
    node = next(n for n in doc["nodes"] if n["id"] == f"package@{TARGET}")
    delivered = cli.tmp / "artifacts" / "packages" / f"pk-{TARGET}-{node['key'][:16]}.tar"
    assert doc["delivered"] == [str(delivered)] and not delivered.stat().st_mode & 0o222
    assert delivered.read_bytes() == (real["out"] / f"package@{TARGET}" / "package.tar").read_bytes()
    assert check_archive(delivered) == []
    again = cli.json("build", str(real["cfg"]), "--until", "package")
    assert all(n["cached"] for n in again["nodes"]) and again["delivered"] == [str(delivered)]


@pytest.mark.slow
def test_real_package_runs_its_probe_through_onnx(real: dict[str, Any], tmp_path: Path) -> None:
    from stages.lib.hostside import generate as gen
    from stages.lib.parity.metrics import compare
    from stages.lib.qdq.graphio import session

    out = real["out"]
    pkg = extract(out / f"package@{TARGET}" / "package.tar", tmp_path / "x")
    m = json.loads((pkg / "manifest.json").read_text())
    assert m["graphs"] == list(GRAPHS) and m["parity"]["passed"] is True and m["precision"]["vision"] == "fp8"
    r = json.loads((pkg / "runtime.json").read_text())
    assert r["rope"]["mrope_section"] == [2, 3, 3] and r["special_tokens"]["image_token"] == r["text"]["image_token_id"]
    for g in GRAPHS:  # runtime.json names the graphs' real inputs, and the engines' sidecars agree
        names = [i.name for i in session(pkg / "onnx" / f"{g}.onnx").get_inputs()]
        assert [i["name"] for i in r["graphs"][g]["inputs"]] == names, g
        car = json.loads((pkg / "engines" / f"{g}.engine.json").read_text())
        assert [i["name"] for i in car["inputs"]] == names
    # the package alone (no transformers): vision features of the probe within the build's own gate
    pipe = gen.OrtPipeline.from_folder(pkg / "onnx", pkg / "onnx", optimization="none")  # Q/DQ FP8: ORT fusions off
    probe, gates = load_probe(pkg / "probe/probe.npz"), json.loads((pkg / "probe/probe.json").read_text())["gates"]
    for s in probe:
        feats, _ = pipe.visual_features(gen.Prompt(s["input_ids"], pixel_values=s["pixel_values"],
                                                   image_grid_thw=s["image_grid_thw"]))
        assert compare(np.asarray(feats, np.float32), s["vision_features"]).cosine >= gates["vision"]["gate"]["cosine"]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(pkg / "tokenizer")
    assert tok.convert_tokens_to_ids("<|image_pad|>") == r["special_tokens"]["image_token"]
    # the stage function on the same folders: same bytes as the CLI's; the --no-onnx variant
    inputs = {d: out / (f"{d}@{TARGET}" if d in ("engine", "quantize", "verify") else d) for d in STAGE.deps}
    cfg = BuildConfig.model_validate({"name": "pk", "model": {"generate": "tiny", "family": "qwen2_5_vl"},
                                      "targets": [TARGET]})
    _, again = _run(inputs, tmp_path / "again", cfg=cfg)
    assert (again / "package.tar").read_bytes() == (out / f"package@{TARGET}" / "package.tar").read_bytes()
    _, lean = _run(inputs, tmp_path / "lean", cfg=cfg, onnx=False)
    assert not any("/onnx/" in n for n in _names(lean / "package.tar")) and check_archive(lean / "package.tar") == []
