"""Checkpoint library: family detection, validation, tiny generation, loading."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from pipeline.stage import StageError
from stages.lib.checkpoints import local as ck
from stages.lib.checkpoints.tiny import generate_tiny

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpt")
    return {f: generate_tiny(f, root / f, seed=0) for f in FAMILIES}


def test_detect_family_of_generated(tiny: dict[str, Path]) -> None:
    for fam, path in tiny.items():
        assert ck.detect_family(path) == fam


def test_detect_family_by_architecture(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["Qwen2_5_VLForConditionalGeneration"]}))
    assert ck.detect_family(tmp_path) == "qwen2_5_vl"


def test_unsupported_checkpoint_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(StageError) as e:
        ck.detect_family(tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and "llama" in msg and "qwen2_vl" in msg and "qwen3_vl" in msg


def test_missing_config(tmp_path: Path) -> None:
    with pytest.raises(StageError, match="config.json"):
        ck.detect_family(tmp_path)


def _sharded_copy(src: Path, dst: Path) -> Path:
    """Copy a checkpoint and split its weights into two shards with an index."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    (dst / "model.safetensors").unlink()
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    weight_map = {}
    for shard, keys in halves.items():
        save_file({k: tensors[k].contiguous() for k in keys}, str(dst / shard), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(keys, shard))
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return dst


def test_sharded_checkpoint_validates_and_loads(tiny: dict[str, Path], tmp_path: Path) -> None:
    d = _sharded_copy(tiny["qwen2_vl"], tmp_path / "sharded")
    files = ck.validate_checkpoint(d)
    assert d / "model-00002-of-00002.safetensors" in files and d / "config.json" in files
    model = ck.load_model(d)
    assert sum(p.numel() for p in model.parameters()) > 0


def test_missing_shard_names_the_file(tiny: dict[str, Path], tmp_path: Path) -> None:
    d = _sharded_copy(tiny["qwen2_vl"], tmp_path / "sharded")
    (d / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(StageError) as e:
        ck.validate_checkpoint(d)
    assert "model-00002-of-00002.safetensors" in str(e.value) and "\n" not in str(e.value)


def test_pickle_only_weights_refused(tiny: dict[str, Path], tmp_path: Path) -> None:
    d = tmp_path / "pickled"
    d.mkdir()
    shutil.copy(tiny["qwen2_vl"] / "config.json", d)
    (d / "pytorch_model.bin").write_bytes(b"not really a pickle")
    with pytest.raises(StageError, match="pickle"):
        ck.validate_checkpoint(d)


def test_generation_is_deterministic(tmp_path: Path) -> None:
    a = generate_tiny("qwen2_5_vl", tmp_path / "a", seed=3)
    b = generate_tiny("qwen2_5_vl", tmp_path / "b", seed=3)
    c = generate_tiny("qwen2_5_vl", tmp_path / "c", seed=4)
    read = lambda p: (p / "model.safetensors").read_bytes()  # noqa: E731
    assert read(a) == read(b)
    assert read(a) != read(c)


def test_resolve_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "checkpoint.json").write_text(json.dumps({"path": "model", "family": "qwen3_vl"}))
    assert ck.resolve_checkpoint(tmp_path) == (tmp_path / "model", "qwen3_vl")
    (tmp_path / "checkpoint.json").write_text(json.dumps({"path": "/abs/ckpt", "family": "qwen2_vl"}))
    assert ck.resolve_checkpoint(tmp_path) == (Path("/abs/ckpt"), "qwen2_vl")


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_generates_varied_tokens(tiny: dict[str, Path], family: str) -> None:
    """A model that repeats one token proves nothing about parity: greedy output must vary."""
    import numpy as np
    import torch
    from PIL import Image

    path = tiny[family]
    image_proc, tok = ck.load_processor(path)
    img = Image.fromarray((np.random.RandomState(0).rand(112, 168, 3) * 255).astype("uint8"))
    vis = image_proc(images=[img], return_tensors="pt")
    n = int(vis["image_grid_thw"].prod()) // image_proc.merge_size**2
    text = "<|im_start|> user <|vision_start|>" + "<|image_pad|>" * n + "<|vision_end|> ba ke <|im_end|>"
    ids = tok(text, return_tensors="pt")
    mm = (ids["input_ids"] == tok.convert_tokens_to_ids("<|image_pad|>")).int()
    model = ck.load_model(path)
    with torch.no_grad():
        out = model.generate(**ids, **vis, mm_token_type_ids=mm, max_new_tokens=16, do_sample=False)
    new = out[0, ids["input_ids"].shape[1]:].tolist()
    assert len(new) == 16
    assert len(set(new)) >= 6, new


def _stage_run(cfg_model: dict, out: Path) -> tuple[dict, object]:
    from pipeline.config import BuildConfig
    from pipeline.stage import StageContext
    from stages import checkpoint as stage

    cfg = BuildConfig.model_validate({"name": "t", "model": cfg_model, "targets": ["rtx4090"]})
    out.mkdir(parents=True, exist_ok=True)
    params = stage.STAGE.params(cfg, None)
    json.dumps(params)  # JSON-able: it is hashed into the cache key
    res = stage.STAGE.run(StageContext("checkpoint", params, {}, out, None, []))
    ext = stage.STAGE.external(cfg) if stage.STAGE.external else []
    return json.loads((out / "checkpoint.json").read_text()), (res, ext)


def test_checkpoint_stage_generated_and_user(tiny: dict[str, Path], tmp_path: Path) -> None:
    meta, (res, ext) = _stage_run({"generate": "tiny", "family": "qwen3_vl", "seed": 1}, tmp_path / "gen")
    assert meta == {"path": "model", "family": "qwen3_vl"} and ext == []
    assert ck.resolve_checkpoint(tmp_path / "gen") == (tmp_path / "gen" / "model", "qwen3_vl")
    meta, (res, ext) = _stage_run({"checkpoint": str(tiny["qwen2_5_vl"])}, tmp_path / "user")
    assert meta == {"path": str(tiny["qwen2_5_vl"].resolve()), "family": "qwen2_5_vl"}
    assert not (tmp_path / "user" / "model").exists()  # user weights are referenced, never copied
    names = {p.name for p in ext}
    assert {"config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json"} <= names


def test_checkpoint_stage_cnn_tiny(tmp_path: Path) -> None:
    meta, _ = _stage_run({"generate": "cnn-tiny"}, tmp_path / "cnn")
    assert meta["family"] == "resnet" and (tmp_path / "cnn" / "model" / "config.json").is_file()
