"""Hand-made build folders for the package stage's tests (tests/test_package_stage_*.py), in the
documented formats: engine@T (engines and their sidecars), quantize@T (io specs), checkpoint (a
tokenizer's files), reference (reference.npz) and verify@T; and the stage run on them.
"""

from __future__ import annotations

import hashlib
import json
import tarfile
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import BuildConfig
from pipeline.stage import StageContext, StageResult
from pipeline.targets import load_catalog
from stages.package import STAGE

TARGET = "rtx4090"
GRAPHS = ("vision", "embed", "decoder")
TOKENIZER = ("chat_template.jinja", "generation_config.json", "preprocessor_config.json", "tokenizer.json",
             "tokenizer_config.json")


def _cfg(**over: Any) -> BuildConfig:
    return BuildConfig.model_validate({"name": "pk", "model": {"generate": "tiny", "family": "qwen2_5_vl"},
                                       "targets": [TARGET], **over})


def _write(path: Path, doc: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(doc if isinstance(doc, bytes) else json.dumps(doc, indent=1).encode())
    return path


def _checkpoint(root: Path, family: str = "qwen2_5_vl") -> Path:
    ck = root / "checkpoint"
    _write(ck / "checkpoint.json", {"path": "model", "family": family})
    m = ck / "model"
    _write(m / "config.json", {
        "model_type": family, "image_token_id": 510, "video_token_id": 511, "vision_start_token_id": 508,
        "vision_end_token_id": 509, "text_config": {"bos_token_id": 505, "eos_token_id": 507, "pad_token_id": 505,
                                                    "rope_parameters": {"mrope_section": [2, 3, 3], "rope_theta": 1e6,
                                                                        "rope_type": "default"}}})
    added = [{"id": i, "content": c, "special": True} for i, c in
             [(0, "<unk>"), (505, "<|endoftext|>"), (507, "<|im_end|>"), (508, "<|vision_start|>"),
              (509, "<|vision_end|>"), (510, "<|image_pad|>"), (511, "<|video_pad|>")]]
    _write(m / "tokenizer.json", {"added_tokens": added, "model": {"type": "WordLevel", "vocab": {"a": 1, "b": 2}}})
    _write(m / "tokenizer_config.json", {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "unk_token": "<unk>"})
    _write(m / "chat_template.jinja", b"{% for m in messages %}{{ m.content }}{% endfor %}")
    _write(m / "preprocessor_config.json", {"patch_size": 14, "merge_size": 2, "image_mean": [0.5] * 3})
    _write(m / "generation_config.json", {"eos_token_id": [507, 505], "do_sample": False})
    _write(m / "model.safetensors", b"weights: never packaged")
    return ck


def _spec(names: list[str]) -> dict[str, Any]:
    return {"inputs": [{"name": n, "dtype": "float16", "shape": ["batch", "seq", 64]} for n in names],
            "outputs": [{"name": "out", "dtype": "float16", "shape": ["batch", 64]}], "dtype": "fp16", "opset": 19}


def _build(root: Path, graphs: tuple[str, ...] = GRAPHS, applied: tuple[str, ...] = (),
           target: str = TARGET) -> dict[str, Path]:
    """Hand-made engine@T / quantize@T / checkpoint / reference / verify@T folders."""
    q, e, ref, ver = root / "quantize", root / "engine", root / "reference", root / "verify"
    for d in (q, e, ref, ver):
        d.mkdir(parents=True)
    vision = {**_spec(["pixel_values", "rotary_cos"]), "profile": {"patches": {"min": 16, "max": 2048}},
              "spec": {"family": "qwen2_5_vl", "patch_size": 14, "merge_size": 2}}
    _write(q / "vision.json", vision)
    if "decoder" in graphs:
        _write(q / "decoder.json", {**_spec(["inputs_embeds", "attention_mask", "position_ids"]),
                                    "host": {"family": "qwen2_5_vl", "image_token_id": 510, "video_token_id": 511,
                                             "spatial_merge_size": 2, "tokens_per_second": 4.0, "deepstack_layers": 0},
                                    "embed": _spec(["input_ids"])})
    _write(q / "quantize.json", {g: {"precision": "fp8" if g != "embed" else "fp16"} for g in graphs})
    for g in graphs:
        _write(q / f"{g}.onnx", f"onnx bytes of {g}".encode())
        engine = f"engine bytes of {g} for {target}".encode() * 50
        _write(e / f"{g}.engine", engine)
        _write(e / f"{g}.layers.json", {"layers": 3})
        _write(e / f"{g}.engine.json", {"graph": g, "target": target, "sm": "8.9", "builder": "tensorrt-rtx",
                                        "builder_version": "1.7.1.116", "precision": "fp8",
                                        "sha256": hashlib.sha256(engine).hexdigest(),
                                        "options": {"applied": ["compute_capability=SM89", *applied]}})
    arrays = {"s0.pixel_values": np.arange(12, dtype=np.float32).reshape(2, 6),
              "s0.image_grid_thw": np.array([[1, 2, 2]]), "s0.vision_features": np.ones((1, 64), np.float32),
              "s1.input_ids": np.array([[1, 2, 510]]), "s1.logits": np.zeros((1, 3, 8), np.float32),
              "s1.generated": np.array([3, 4]), "s1.deepstack.0": np.zeros((1, 4), np.float32)}
    np.savez(ref / "reference.npz", **arrays)  # type: ignore[arg-type]
    _write(ref / "reference.json", {"family": "qwen2_5_vl", "samples": [{"seq_len": 0}, {"seq_len": 3}]})
    _write(ver / "verify.json", {"target": target, "passed": True, "rows": [{"graph": "vision", "status": "pass"}]})
    return {"engine": e, "quantize": q, "checkpoint": _checkpoint(root), "reference": ref, "verify": ver}


def _run(inputs: dict[str, Path], out: Path, cfg: BuildConfig | None = None,
         **params: Any) -> tuple[StageResult, Path]:
    t = load_catalog()[TARGET]
    out.mkdir(parents=True)
    ctx = StageContext(node_id=f"package@{TARGET}", params={**STAGE.params(cfg or _cfg(), t), **params},
                       inputs=inputs, out=out, target=t.model_dump(), external=[])
    return STAGE.run(ctx), out


def _names(tar: Path) -> list[str]:
    with tarfile.open(tar) as tf:
        return tf.getnames()
