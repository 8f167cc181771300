"""CNN vision tower: export a ``transformers`` convolutional backbone (ResNet; ConvNeXt too)
to ``vision.onnx`` + ``vision.json``, with ONNX-Runtime-vs-PyTorch parity, and generate the
small ResNet checkpoint behind ``model.generate: cnn-tiny``.

Graph: ``pixel_values`` (NCHW; batch, height, width dynamic) → ``image_features`` (pooled,
(batch, C)) and ``logits`` when the checkpoint has a classifier head.

Exporter: TorchScript with ``training=PRESERVE``. In EVAL mode it folds BatchNormalization into
Conv itself (its eval peephole), which would leave the fuse stage's BN rule nothing to do and
hide the Conv→BN→ReLU structure a user's own ONNX has; PRESERVE on an eval-mode model writes
inference BN nodes and otherwise the same plain graph (Conv, BN, Relu, Add, MaxPool, GAP, Gemm),
in ~1 s against ~12 s and 100+ shape-helper nodes for the dynamo exporter measured here.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from pipeline.config import IMAGENET_MEAN, IMAGENET_STD
from stages.lib.dtypes import CONFIG_NUMPY, torch_dtype


def generate_tiny_cnn(out_dir: str | Path, seed: int = 0) -> Path:
    """A ResNet-18-shaped classifier (basic blocks, depths 2-2-2-2) with narrow channels,
    random weights and random BN statistics (so BN folding has real work), saved as a local
    Hugging Face checkpoint with a preprocessor config. Returns ``out_dir``."""
    import torch
    from transformers import ResNetConfig, ResNetForImageClassification
    from transformers.models.convnext.image_processing_pil_convnext import ConvNextImageProcessorPil

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    kw: dict[str, Any] = {"num_labels": 10, "id2label": {i: f"class_{i}" for i in range(10)},
                          "label2id": {f"class_{i}": i for i in range(10)}}
    cfg = ResNetConfig(embedding_size=32, hidden_sizes=[32, 64, 128, 256], depths=[2, 2, 2, 2],
                       layer_type="basic", **kw)
    model = ResNetForImageClassification(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                bn: Any = m  # its affine/stat tensors are typed Optional; here they all exist
                n = bn.num_features
                bn.weight.copy_(0.5 + torch.rand(n, generator=g))
                bn.bias.copy_(0.1 * torch.randn(n, generator=g))
                bn.running_mean.copy_(0.1 * torch.randn(n, generator=g))
                bn.running_var.copy_(0.5 + torch.rand(n, generator=g))
    model.save_pretrained(out, safe_serialization=True)
    # The processor ResNet checkpoints ship (ConvNeXt's); the PIL variant needs no torchvision.
    ConvNextImageProcessorPil(size={"shortest_edge": 224}, crop_pct=224 / 256, image_mean=list(IMAGENET_MEAN),
                              image_std=list(IMAGENET_STD)).save_pretrained(out)
    return out


def _load(model_path: Path, trust_remote_code: bool = False) -> Any:
    """The checkpoint's model in FP32, eval mode, loaded under the checkpoints policy
    (offline, safetensors only, remote code only when model.trust_remote_code allows it)."""
    from transformers import AutoModel, AutoModelForImageClassification

    from stages.lib.checkpoints.local import from_pretrained, load_config_hf, validate_checkpoint

    validate_checkpoint(model_path)
    cfg = load_config_hf(model_path, trust_remote_code)
    archs = cfg.architectures or []
    auto = AutoModelForImageClassification if any(a.endswith("ForImageClassification") for a in archs) else AutoModel
    return from_pretrained(auto, model_path, "model", trust_remote_code, dtype="float32",
                           use_safetensors=True).eval()


def _wrap(model: Any) -> tuple[Any, list[str]]:
    import torch

    backbone = getattr(model, "resnet", None) or getattr(model, "convnext", None) or model
    head = getattr(model, "classifier", None) if backbone is not model else None

    class Tower(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone, self.head = backbone, head

        def forward(self, pixel_values: torch.Tensor) -> Any:
            pooled = self.backbone(pixel_values=pixel_values).pooler_output.flatten(1)
            return (pooled, self.head(pooled)) if self.head is not None else pooled

    return Tower().eval(), ["image_features", "logits"] if head is not None else ["image_features"]


def _parity(onnx_path: Path, tower: Any, sizes: list[list[int]], seed: int, np_dtype: str) -> Any:
    import numpy as np
    import torch

    from stages.lib.ortsession import ort_session
    from stages.lib.parity.metrics import compare, worst

    sess = ort_session(onnx_path)
    rng = np.random.default_rng(seed)
    out: list[Any] = []
    batches = [(1, h, w) for h, w in sizes] + [(2, *sizes[0])]  # each size, and a batch of 2
    for b, h, w in batches:
        x = rng.standard_normal((b, 3, h, w)).astype(np.float32)
        with torch.no_grad():
            ref = tower(torch.from_numpy(x))
        ref = ref if isinstance(ref, tuple) else (ref,)
        got = sess.run(None, {"pixel_values": x.astype(np_dtype)})
        out.extend(compare(np.asarray(g, np.float32), r.numpy()) for g, r in zip(got, ref, strict=True))
    return worst(out)


def export_cnn(model_path: Path, out_dir: Path, params: dict[str, Any]) -> dict[str, Any]:
    """Export + parity; writes vision.onnx and vision.json into ``out_dir``; returns metrics, whose
    ``parity`` (the worst figures) the ``export_vision`` stage gates."""
    import torch

    t0 = time.time()
    out_dir.mkdir(parents=True, exist_ok=True)
    model = _load(Path(model_path), bool(params.get("trust_remote_code", False)))
    tower32, names = _wrap(model)
    dtype = params.get("dtype", "fp16")
    tdt = torch_dtype(dtype)
    h, w = params.get("sample_image", [224, 224])
    sample = torch.randn(1, 3, int(h), int(w), dtype=tdt)
    onnx_path = out_dir / "vision.onnx"
    import copy

    tower = copy.deepcopy(tower32).to(tdt)  # the FP32 tower stays the parity reference
    axes = {"pixel_values": {0: "batch", 2: "height", 3: "width"}, **{n: {0: "batch"} for n in names}}
    torch.onnx.export(tower, (sample,), str(onnx_path), input_names=["pixel_values"], output_names=names,
                      opset_version=int(params.get("opset", 19)), dynamo=False, dynamic_axes=axes,
                      training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=True)
    export_s = time.time() - t0
    np_dt = CONFIG_NUMPY[dtype]
    sizes = [list(s) for s in params.get("verify_sizes", [[112, 168], [196, 140]])]
    parity = _parity(onnx_path, tower32, sizes, int(params.get("seed", 0)), np_dt)
    prof = params.get("profile", {})
    lo, opt, hi = (prof.get(k, d) for k, d in (("min_image", [56, 56]), ("opt_image", [224, 224]),
                                               ("max_image", [448, 448])))
    feat = int(model.config.hidden_sizes[-1])
    out_shapes = {"image_features": ["batch", feat], "logits": ["batch", int(getattr(model.config, "num_labels", 0))]}
    ort_dt = "float16" if dtype == "fp16" else "float32"
    spec = {
        "inputs": [{"name": "pixel_values", "dtype": ort_dt, "shape": ["batch", 3, "height", "width"]}],
        "outputs": [{"name": n, "dtype": ort_dt, "shape": out_shapes[n]} for n in names],
        "profile": {"batch": {"min": 1, "opt": 1, "max": int(prof.get("max_images", 2))},
                    "height": {"min": lo[0], "opt": opt[0], "max": hi[0]},
                    "width": {"min": lo[1], "opt": opt[1], "max": hi[1]}},
        "dtype": dtype, "opset": int(params.get("opset", 19)), "family": str(model.config.model_type),
        "layout": "NCHW", "preprocess": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
        "exporter": "torchscript (training=PRESERVE: BatchNormalization kept for the fuse stage)",
        "parity": {**parity.as_dict(), "sizes": sizes, "reference": "PyTorch FP32"},
    }
    (out_dir / "vision.json").write_text(json.dumps(spec, indent=1))
    metrics = {"family": spec["family"], "dtype": dtype, "export_seconds": round(export_s, 2),
               "parity": parity.as_dict(), "onnx_bytes": onnx_path.stat().st_size,
               "seconds": round(time.time() - t0, 2)}
    return metrics
