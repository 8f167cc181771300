"""CNN vision tower: generated ResNet checkpoint → vision.onnx with parity → fuse stage."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from stages.lib.export.cnn import generate_tiny_cnn

    return generate_tiny_cnn(tmp_path_factory.mktemp("cnn") / "model", seed=0)


def test_generated_checkpoint_is_a_resnet_checkpoint(ckpt: Path) -> None:
    from stages.lib.checkpoints.local import detect_family

    assert detect_family(ckpt) == "resnet"
    assert (ckpt / "model.safetensors").is_file() and (ckpt / "preprocessor_config.json").is_file()
    cfg = json.loads((ckpt / "config.json").read_text())
    assert cfg["depths"] == [2, 2, 2, 2] and cfg["layer_type"] == "basic"


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_export_parity_and_io_spec(ckpt: Path, tmp_path: Path, dtype: str) -> None:
    from stages.lib.export.cnn import export_cnn

    m = export_cnn(ckpt, tmp_path, {"dtype": dtype, "opset": 19, "seed": 3, "verify_sizes": [[112, 168], [96, 96]]})
    assert m["parity"]["cosine"] >= 0.9999
    assert m["parity"]["max_abs"] < (1e-4 if dtype == "fp32" else 0.1)
    g = onnx.load(str(tmp_path / "vision.onnx"))
    onnx.checker.check_model(g)
    (inp,) = g.graph.input
    assert [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim] == ["batch", 3, "height", "width"]
    assert inp.type.tensor_type.elem_type == (onnx.TensorProto.FLOAT16 if dtype == "fp16" else onnx.TensorProto.FLOAT)
    assert [o.name for o in g.graph.output] == ["image_features", "logits"]
    ops = [n.op_type for n in g.graph.node]
    assert ops.count("Conv") == 20 and ops.count("BatchNormalization") == 20  # BN left for the fuse stage
    spec = json.loads((tmp_path / "vision.json").read_text())
    assert spec["family"] == "resnet" and spec["outputs"][0]["shape"] == ["batch", 256]
    assert spec["profile"]["height"] == {"min": 56, "opt": 224, "max": 448}


def test_parity_gate_can_fail(ckpt: Path, tmp_path: Path) -> None:
    """The export_vision stage gates a CNN tower's parity (FP16: gates.fp16); a max_abs no FP16
    graph meets is missed, and the worker fails the node with that line."""
    from pipeline.config import BuildConfig
    from pipeline.stage import StageContext, missed_message
    from stages.export_vision import STAGE

    (ckpt.parent / "checkpoint.json").write_text(json.dumps({"path": ckpt.name, "family": "resnet"}))
    cfg = BuildConfig.model_validate({"name": "c", "model": {"generate": "cnn-tiny"}, "targets": ["rtx4090"],
                                      "export": {"dtype": "fp16"}, "gates": {"fp16": {"max_abs": 1e-9}}})
    res = STAGE.run(StageContext("export_vision", STAGE.params(cfg, None), {"checkpoint": ckpt.parent}, tmp_path,
                                 None, []))
    missed = missed_message(res.gates)
    assert missed is not None and "vision.max_abs" in missed and "vision.cosine" not in missed


def test_fuse_stage_on_exported_resnet(ckpt: Path, tmp_path: Path) -> None:
    from pipeline.config import BuildConfig
    from pipeline.stage import StageContext
    from stages.fuse import STAGE
    from stages.lib.export.cnn import export_cnn
    from stages.lib.fusion.annotate import read_fusion_groups

    vis, dec, out = tmp_path / "v", tmp_path / "d", tmp_path / "out"
    dec.mkdir()
    export_cnn(ckpt, vis, {"dtype": "fp16", "opset": 19})
    cfg = BuildConfig.model_validate({"name": "c", "model": {"generate": "cnn-tiny"}, "targets": ["rtx4090"]})
    STAGE.run(StageContext("fuse", STAGE.params(cfg, None), {"export_vision": vis, "export_decoder": dec}, out,
                           None, []))
    e = json.loads((out / "fuse.json").read_text())["graphs"]["vision"]
    assert e["rules"]["fold_batchnorm"]["matches"] == 20
    assert "BatchNormalization" not in e["ops_after"]
    # every ReLU sits in one conv partition; projection shortcuts (conv without ReLU) do not
    assert e["conv_act_groups"] == e["ops_after"]["Relu"] == 17
    assert not (out / "decoder.onnx").exists() and (out / "vision.json").is_file()
    table = read_fusion_groups(onnx.load(str(out / "vision.onnx")))
    assert sum(r == "residual_add" for _, _, r in table.values()) == 8


def test_convnext_backbone_exports_too(tmp_path: Path) -> None:
    import torch
    from transformers import ConvNextConfig, ConvNextForImageClassification

    from stages.lib.export.cnn import export_cnn

    torch.manual_seed(0)
    ConvNextForImageClassification(ConvNextConfig(hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1],
                                                  num_labels=5)).eval().save_pretrained(tmp_path / "ck")
    m = export_cnn(tmp_path / "ck", tmp_path / "out", {"dtype": "fp32"})
    assert m["family"] == "convnext" and m["parity"]["cosine"] >= 0.9999
    spec = json.loads((tmp_path / "out" / "vision.json").read_text())
    assert [o["shape"] for o in spec["outputs"]] == [["batch", 128], ["batch", 5]]
