"""Bring your own ONNX, end to end through the real CLI: a config that names only an FP32 vision
ONNX (no checkpoint) builds int8/fp8 engines, graded against that ONNX itself in onnxruntime."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from tests.conftest import Cli

TARGETS = {"rtx3090": "int8", "rtx4090": "fp8"}  # precision best: rtx3090 has no FP8


def _tiny_cnn(path: Path, opset: int = 19, dynamic_hw: bool = False) -> None:
    """A small conv net (conv-bn-relu stages, pooled features, a classifier), FP32, NCHW input
    ``image`` with a dynamic batch, as a user's own exporter would write it. Its pooled features
    are squeezed (not flattened): below opset 13 Squeeze takes its axes as an attribute."""
    import torch

    torch.manual_seed(0)
    nn = torch.nn

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                      nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                                      nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
            self.head = nn.Linear(32, 10)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            f = self.body(x).squeeze(-1).squeeze(-1)
            return f, self.head(f)

    net = Net().eval()
    for m in net.modules():  # non-trivial BN statistics, so folding them is not a no-op
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    torch.onnx.export(net, (torch.randn(1, 3, 64, 64),), str(path), input_names=["image"],
                      output_names=["features", "logits"],
                      dynamic_axes={"image": {0: "batch", 2: "height", 3: "width"} if dynamic_hw else {0: "batch"}},
                      opset_version=opset, dynamo=False)


CONFIG = """
name: byo
model:
  vision_onnx: {path: net.onnx, input_name: image, layout: NCHW, resize: [64, 64],
                mean: [0.5, 0.5, 0.5], std: [0.25, 0.25, 0.25]}
targets: [rtx3090, rtx4090]
calibration: {samples: 4}
engine: {workspace_mb: 256}
"""


def test_byo_onnx_builds_end_to_end(tmp_path: Path) -> None:
    import stages

    _tiny_cnn(tmp_path / "net.onnx")
    cli = Cli(tmp_path, stages=",".join(stages.STAGE_MODULES))
    cfg = cli.config(CONFIG, name="byo.yaml")
    r = cli("build", str(cfg), "-j", "2", "--json", timeout=900)
    nodes = {n["id"]: n for n in json.loads(r.stdout)["nodes"]}
    want = ["checkpoint", "export_vision", "export_decoder", "fuse", "calibrate", "reference",
            *(f"{s}@{t}" for s in ("quantize", "engine", "verify", "package") for t in TARGETS)]
    assert sorted(nodes) == sorted(want)
    assert all(n["status"] == "ran" for n in nodes.values()), {k: n["status"] for k, n in nodes.items()}

    out = tmp_path / "artifacts" / "out" / "byo"
    assert json.loads((out / "checkpoint" / "checkpoint.json").read_text()) == {"path": None, "family": "byo"}
    assert "absent" in json.loads((out / "export_decoder" / "decoder.json").read_text())
    ref = json.loads((out / "reference" / "reference.json").read_text())
    assert ref["family"] == "byo" and ref["reference"].startswith("onnxruntime fp32") and ref["outputs"][0] == "features"
    # each held-out image carries its noise floor: the reference under ±½ grey level (parity.noise_floor)
    assert all(0.9 < m["noise_floor"]["cosine"] <= 1.0 and m["noise_floor"]["norm_ratio"] >= 0 for m in ref["samples"])
    with np.load(out / "reference" / "reference.npz") as z:
        ref0 = {k.split(".", 1)[1]: z[k] for k in z.files if k.startswith("s0.")}
    # preprocessed exactly as declared (bicubic resize to 64x64, /255, mean/std, NCHW), and the
    # reference outputs are the FP32 ONNX itself on that tensor
    import onnxruntime as ort
    from PIL import Image

    assert ref0["image"].shape[:2] != (64, 64)  # a held-out size, resized by the declared rule
    img = np.asarray(Image.fromarray(ref0["image"]).resize((64, 64), Image.Resampling.BICUBIC), np.float32)
    want = ((img / 255.0 - 0.5) / 0.25).transpose(2, 0, 1)[None]
    np.testing.assert_allclose(ref0["pixel_values"], want, atol=1e-5)
    feats, logits = ort.InferenceSession(str(tmp_path / "net.onnx")).run(None, {"image": want.astype(np.float32)})
    np.testing.assert_allclose(ref0["vision_features"], feats, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(ref0["logits"], logits, rtol=1e-4, atol=1e-5)
    for target, prec in TARGETS.items():
        q = json.loads((out / f"quantize@{target}" / "quantize.json").read_text())
        assert q["vision"]["precision"] == prec and q["vision"]["qdq_pairs"] > 0 and "decoder" not in q
        assert q["vision"]["parity"]["vs_reference"]["cosine"] >= 0.99
        eng = out / f"engine@{target}"
        assert (eng / "vision.engine").stat().st_size > 0 and not (eng / "decoder.engine").exists()
        side = json.loads((eng / "vision.engine.json").read_text())
        assert side["profile"]["image"] == {"min": [1, 3, 64, 64], "opt": [1, 3, 64, 64], "max": [2, 3, 64, 64]}
        v = json.loads((out / f"verify@{target}" / "verify.json").read_text())
        assert v["passed"] is True
        rows = {r["runtime"]: r for r in v["rows"] if r["graph"] == "vision"}
        ort_row = rows["onnxruntime"]
        assert ort_row["status"] == "pass" and ort_row["precision"] == prec
        assert ort_row["figures"]["cosine"] >= 0.99 and ort_row["figures"]["top1"] >= 0.5
        assert set(ort_row["figures"]["thresholds"]) == {"cosine", "norm_ratio"}  # graded at the floors
        assert rows["tensorrt"]["status"] in ("pass", "not-run")  # runs only on a GPU of that SM

    # a second build runs nothing; a changed ONNX (content, same path) re-keys export and reference
    again = json.loads(cli("build", str(cfg), "--json").stdout)
    assert all(n["status"] == "cached" for n in again["nodes"])
    import onnx

    m = onnx.load(str(tmp_path / "net.onnx"))
    m.doc_string = "changed"
    onnx.save(m, str(tmp_path / "net.onnx"))
    plan = {n["id"]: n for n in cli.json("plan", str(cfg))}  # type: ignore[union-attr]
    assert not plan["export_vision"]["cached"] and not plan["reference"]["cached"]
    assert plan["checkpoint"]["cached"]  # no checkpoint: nothing of it changed


def test_an_old_opset_graph_is_upgraded_at_import_and_quantizes(tmp_path: Path) -> None:
    """An opset-12 graph (Squeeze with an axes attribute) once passed export and failed in
    quantize; it is upgraded to 19 where it enters, proven equal to the original, and builds."""
    import onnx

    import stages

    _tiny_cnn(tmp_path / "net.onnx", opset=12)
    src = onnx.load(str(tmp_path / "net.onnx"))
    assert src.opset_import[0].version == 12 and any(a.name == "axes" for n in src.graph.node if n.op_type == "Squeeze"
                                                     for a in n.attribute)
    cli = Cli(tmp_path, stages=",".join(stages.STAGE_MODULES))
    r = cli("build", str(cli.config(CONFIG, name="byo.yaml")), "--until", "quantize", "-j", "2", "--json", timeout=900)
    nodes = {n["id"]: n for n in json.loads(r.stdout)["nodes"]}
    assert all(n["status"] == "ran" for n in nodes.values()), {k: (n["status"], n["error"]) for k, n in nodes.items()}
    ev = nodes["export_vision"]
    assert ev["metrics"]["opset_upgraded_from"] == 12
    assert any("upgraded from opset 12 to 19" in x for x in ev["notes"])
    out = tmp_path / "artifacts" / "out" / "byo"
    up = onnx.load(str(out / "export_vision" / "vision.onnx"))
    assert up.opset_import[0].version == 19
    assert all(len(n.input) == 2 and not n.attribute for n in up.graph.node if n.op_type == "Squeeze")
    assert (tmp_path / "net.onnx").read_bytes() == src.SerializeToString()  # the user's file is untouched
    for target, prec in TARGETS.items():
        q = json.loads((out / f"quantize@{target}" / "quantize.json").read_text())
        assert q["vision"]["precision"] == prec and q["vision"]["parity"]["vs_reference"]["cosine"] >= 0.99


def test_byo_calibrates_and_is_graded_on_image_folders(tmp_path: Path) -> None:
    """Issue 13: real files for a bring-your-own graph: calibration.images with no prompts (it has
    no decoder), a held-out verify.images folder; each image resized once, by the graph's own
    declared preprocessing; the reference and verify name the held-out images."""
    from PIL import Image

    import stages
    from stages.lib.qdq.calibset import synthetic_image

    _tiny_cnn(tmp_path / "net.onnx")
    for folder, seed, n in (("cal", 0, 4), ("held", 1, 3)):
        (tmp_path / folder).mkdir()
        for i in range(n):
            size = (90 + 10 * i, 120)
            Image.fromarray(synthetic_image(*size, np.random.default_rng([seed, i]))).save(tmp_path / folder / f"{folder}{i}.png")
    cli = Cli(tmp_path, stages=",".join(stages.STAGE_MODULES))
    cfg = cli.config(CONFIG.replace("targets: [rtx3090, rtx4090]", "targets: [rtx3090]")
                     .replace("calibration: {samples: 4}", "calibration: {samples: 4, source: folder, images: cal}\n"
                              "verify: {images: held}"), name="byo.yaml")
    r = cli("build", str(cfg), "--until", "verify", "--json", timeout=900)
    nodes = {n["id"]: n for n in json.loads(r.stdout)["nodes"]}
    assert all(n["status"] == "ran" for n in nodes.values()), {k: n["status"] for k, n in nodes.items()}
    out = tmp_path / "artifacts" / "out" / "byo"
    ref = json.loads((out / "reference" / "reference.json").read_text())
    assert [s["image"] for s in ref["samples"]] == ["held0.png", "held1.png"]  # verify.samples: 2
    assert [s["image_size"] for s in ref["samples"]] == [[90, 120], [100, 120]]  # not resized before the graph's rule
    v = json.loads((out / "verify@rtx3090" / "verify.json").read_text())
    assert v["reference"]["images"] == ["held0.png", "held1.png"] and str(tmp_path / "held") in v["reference"]["held_out"]
    assert v["passed"] is True


def test_byo_keep_aspect_builds_one_engine_for_many_image_sizes(tmp_path: Path) -> None:
    """Issue 13: a graph dynamic in H and W with ``fit: keep-aspect``: each held-out image keeps
    its aspect inside profiles.vision, on the stride grid, and the engine's profile spans
    min..max; a graph with a fixed size is refused that fit at the first stage, in one line."""
    from PIL import Image

    import stages
    from stages.lib.qdq.calibset import synthetic_image

    _tiny_cnn(tmp_path / "net.onnx", dynamic_hw=True)
    (tmp_path / "held").mkdir()
    for name, size in (("a_wide.png", (90, 120)), ("b_tall.png", (300, 200))):
        Image.fromarray(synthetic_image(*size, np.random.default_rng([3, size[0]]))).save(tmp_path / "held" / name)
    cli = Cli(tmp_path, stages=",".join(stages.STAGE_MODULES))
    text = (CONFIG.replace("targets: [rtx3090, rtx4090]", "targets: [rtx3090]")
            .replace("resize: [64, 64],", "fit: keep-aspect, stride: 32,")
            + "verify: {images: held}\nprofiles: {vision: {min_image: [64, 64], opt_image: [128, 128], "
              "max_image: [256, 256]}}\n")
    r = cli("build", str(cli.config(text, name="byo.yaml")), "--until", "verify", "--json", timeout=900)
    nodes = {n["id"]: n for n in json.loads(r.stdout)["nodes"]}
    assert all(n["status"] == "ran" for n in nodes.values()), {k: n["status"] for k, n in nodes.items()}
    out = tmp_path / "artifacts" / "out" / "byo"
    with np.load(out / "reference" / "reference.npz") as z:
        shapes = [z[f"s{i}.pixel_values"].shape for i in range(2)]
    assert shapes == [(1, 3, 96, 128), (1, 3, 256, 160)]  # aspect kept, sides on the 32 grid, inside the profile
    side = json.loads((out / "engine@rtx3090" / "vision.engine.json").read_text())
    assert side["profile"]["image"] == {"min": [1, 3, 64, 64], "opt": [1, 3, 128, 128], "max": [2, 3, 256, 256]}
    assert json.loads((out / "verify@rtx3090" / "verify.json").read_text())["passed"] is True

    _tiny_cnn(tmp_path / "net.onnx")  # fixed 64x64
    r = cli("build", str(cli.config(text, name="byo.yaml")), "--until", "export_vision", check=None)
    assert r.returncode != 0 and "keep-aspect needs a graph dynamic in H and W" in r.stderr + r.stdout
