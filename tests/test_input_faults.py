"""Bad checkpoints and images: one StageError line naming the file and what was expected, no
traceback, nothing followed out of the checkpoint folder. Real inputs: a generated tiny
checkpoint, shards cut short, real symlinks, a hub-cache layout, real (broken) image files."""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from pipeline.stage import StageError
from stages.lib.checkpoints import local as ck
from stages.lib.checkpoints import safetensors_check as st
from stages.lib.checkpoints.tiny import generate_tiny

EXPECT_RGB = "expected an RGB image (png, jpg, bmp, webp, gif, tiff)"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_tiny("qwen2_vl", tmp_path_factory.mktemp("tiny") / "qwen2_vl", seed=0)


@pytest.fixture
def copy(tiny: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny, tmp_path / "ck"))


def _refused(fn, *args, **kw) -> str:  # type: ignore[no-untyped-def]
    with pytest.raises(StageError) as e:
        fn(*args, **kw)
    assert "\n" not in str(e.value)
    return str(e.value)


# --- roles ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "role"), [
    ("config.json", "model"), ("model.safetensors", "model"), ("model-00001-of-00002.safetensors", "model"),
    ("model.safetensors.index.json", "model"), ("generation_config.json", "model"), ("LICENSE.txt", "model"),
    ("tokenizer.json", "tokenizer"), ("tokenizer_config.json", "tokenizer"), ("tokenizer.model", "tokenizer"),
    ("vocab.json", "tokenizer"), ("merges.txt", "tokenizer"), ("special_tokens_map.json", "tokenizer"),
    ("added_tokens.json", "tokenizer"), ("chat_template.json", "tokenizer"), ("chat_template.jinja", "tokenizer"),
    ("qwen.tiktoken", "tokenizer"), ("preprocessor_config.json", "processor"),
    ("video_preprocessor_config.json", "processor"), ("processor_config.json", "processor"),
])
def test_file_role(name: str, role: str) -> None:
    assert ck.file_role(name) == role


def test_checkpoint_files_by_role(tiny: Path) -> None:
    every = ck.checkpoint_files(tiny)
    assert [p.name for p in every] == ["config.json", "generation_config.json", "model.safetensors",
                                       "preprocessor_config.json", "tokenizer.json", "tokenizer_config.json"]
    assert ck.checkpoint_files(tiny, roles=("model", "tokenizer", "processor")) == every
    assert [p.name for p in ck.checkpoint_files(tiny, roles=("model", "processor"))] == [
        "config.json", "generation_config.json", "model.safetensors", "preprocessor_config.json"]
    assert [p.name for p in ck.checkpoint_files(tiny, roles=("tokenizer",))] == ["tokenizer.json",
                                                                                "tokenizer_config.json"]
    with pytest.raises(ValueError, match="unknown checkpoint file role 'weights'"):
        ck.checkpoint_files(tiny, roles=("weights",))


# --- symlinks ------------------------------------------------------------------------------


def test_symlink_out_of_the_folder_refused(copy: Path, tmp_path: Path) -> None:
    secret = tmp_path / "secret.json"
    secret.write_text("{}")
    (copy / "extra.json").symlink_to(secret)
    want = (f"checkpoint {copy.resolve()}: extra.json is a symlink to {secret.resolve()}, outside the checkpoint "
            "folder; refusing to follow it")
    for fn in (ck.checkpoint_files, ck.validate_checkpoint, ck.preflight_checkpoint):
        assert _refused(fn, copy) == want


def test_shard_symlinked_out_of_the_folder_refused(copy: Path, tmp_path: Path) -> None:
    moved = tmp_path / "elsewhere.safetensors"
    (copy / "model.safetensors").rename(moved)
    (copy / "model.safetensors").symlink_to(moved)
    assert _refused(ck.validate_checkpoint, copy) == (
        f"checkpoint {copy.resolve()}: model.safetensors is a symlink to {moved}, outside the checkpoint folder; "
        "refusing to follow it")


def test_links_inside_the_folder_and_a_linked_folder_are_fine(copy: Path, tmp_path: Path) -> None:
    (copy / "sub").mkdir()
    os.replace(copy / "tokenizer.json", copy / "sub" / "tokenizer.json")
    (copy / "tokenizer.json").symlink_to("sub/tokenizer.json")
    (tmp_path / "alias").symlink_to(copy)  # the checkpoint folder itself on another disk
    files = ck.validate_checkpoint(tmp_path / "alias")
    assert tmp_path / "alias" / "tokenizer.json" in files
    ck.preflight_checkpoint(tmp_path / "alias")


def _hub_layout(src: Path, hub: Path, repo: str = "models--org--tiny") -> Path:
    """The Hugging Face hub cache: snapshots/<rev>/<file> -> ../../blobs/<hash>."""
    blobs, snap = hub / repo / "blobs", hub / repo / "snapshots" / "0123abcd"
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    for i, f in enumerate(sorted(src.iterdir())):
        shutil.copy(f, blobs / f"blob{i}")
        (snap / f.name).symlink_to(Path("..", "..", "blobs", f"blob{i}"))
    return snap


def test_hub_cache_snapshot_is_allowed(tiny: Path, tmp_path: Path) -> None:
    snap = _hub_layout(tiny, tmp_path / "hub")
    ck.preflight_checkpoint(snap)
    assert [p.name for p in ck.validate_checkpoint(snap)] == [p.name for p in ck.checkpoint_files(tiny)]
    assert ck.detect_family(snap) == "qwen2_vl"


def test_hub_snapshot_linking_into_another_repo_refused(tiny: Path, tmp_path: Path) -> None:
    snap = _hub_layout(tiny, tmp_path / "hub")
    other = _hub_layout(tiny, tmp_path / "hub", repo="models--org--other")
    (snap / "config.json").unlink()
    (snap / "config.json").symlink_to(other / "config.json")
    target = (other / "config.json").resolve()
    assert _refused(ck.checkpoint_files, snap) == (
        f"checkpoint {snap}: config.json is a symlink to {target}, outside the checkpoint folder; "
        "refusing to follow it")


# --- safetensors ---------------------------------------------------------------------------


def _data_bytes(shard: Path) -> int:
    return st.read_header(shard).data_bytes


def test_truncated_shard_refused(copy: Path) -> None:
    shard = copy / "model.safetensors"
    n = _data_bytes(shard)
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 1000)
    want = f"{shard}: truncated safetensors file (header says {n} data bytes, file has {n - 1000})"
    assert _refused(ck.validate_checkpoint, copy) == want
    assert _refused(ck.preflight_checkpoint, copy) == want


def test_trailing_garbage_refused(copy: Path) -> None:
    shard = copy / "model.safetensors"
    n = _data_bytes(shard)
    with open(shard, "ab") as f:
        f.write(b"junk")
    assert _refused(ck.validate_checkpoint, copy) == (
        f"{shard}: not a safetensors file (bad header: it describes {n} data bytes but the file has {n + 4}: "
        "4 trailing bytes)")


def _raw_shard(path: Path, header: bytes, data: bytes = b"") -> Path:
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return path


@pytest.mark.parametrize(("content", "why"), [
    (b"abc", "the file is 3 bytes, shorter than the 8-byte header length"),
    (b"\xff" * 8 + b"{}", "header length 18446744073709551615 exceeds the 104857600-byte limit"),
    (struct.pack("<Q", 500) + b"{}", "header length 500 runs past the end of the 10-byte file"),
    (struct.pack("<Q", 9) + b"{not json", "not JSON: Expecting property name enclosed in double quotes: "
                                          "line 1 column 2 (char 1)"),
    (struct.pack("<Q", 2) + b"[]", "expected a JSON object"),
])
def test_foreign_shard_refused(copy: Path, content: bytes, why: str) -> None:
    shard = copy / "model.safetensors"
    shard.write_bytes(content)
    assert _refused(ck.validate_checkpoint, copy) == f"{shard}: not a safetensors file (bad header: {why})"


@pytest.mark.parametrize(("entry", "why"), [
    ({"dtype": "F4", "shape": [2], "data_offsets": [0, 8]},
     "tensor 'w' has dtype 'F4', expected one of F64, F32, F16, BF16, F8_E4M3, F8_E5M2, I64, I32, I16, I8, U64, "
     "U32, U16, U8, BOOL"),
    ({"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}, "tensor 'w' spans 8 bytes, its shape [3] of F32 needs 12"),
    ({"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}, "tensor 'w' has data_offsets [8, 0], expected [start, end]"),
    ({"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}, "tensor 'w' has shape [-2], expected a list of sizes"),
])
def test_inconsistent_tensor_entry_refused(tmp_path: Path, entry: dict, why: str) -> None:
    shard = _raw_shard(tmp_path / "x.safetensors", json.dumps({"w": entry}).encode(), b"\0" * 8)
    assert _refused(st.read_header, shard) == f"{shard}: not a safetensors file (bad header: {why})"


def test_offsets_past_the_data_area_are_truncation(tmp_path: Path) -> None:
    header = {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}, "__metadata__": {"format": "pt"}}
    shard = _raw_shard(tmp_path / "x.safetensors", json.dumps(header).encode(), b"\0" * 8)
    assert _refused(st.read_header, shard) == f"{shard}: truncated safetensors file (header says 16 data bytes, file has 8)"


def _shard_in_two(src: Path) -> Path:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(src / "model.safetensors"))
    (src / "model.safetensors").unlink()
    names = sorted(tensors)
    weight_map = {}
    for i, keys in enumerate((names[: len(names) // 2], names[len(names) // 2:]), 1):
        shard = f"model-0000{i}-of-00002.safetensors"
        save_file({k: tensors[k].contiguous() for k in keys}, str(src / shard))
        weight_map.update(dict.fromkeys(keys, shard))
    index = src / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return index


def test_index_naming_an_absent_tensor_refused(copy: Path) -> None:
    index = _shard_in_two(copy)
    ck.validate_checkpoint(copy)
    data = json.loads(index.read_text())
    data["weight_map"]["model.ghost.weight"] = "model-00002-of-00002.safetensors"
    index.write_text(json.dumps(data))
    assert _refused(ck.validate_checkpoint, copy) == (
        f"{index}: weight_map puts tensor 'model.ghost.weight' in model-00002-of-00002.safetensors, "
        "which has no such tensor")
    data["weight_map"]["model.ghost.weight"] = "../../outside.safetensors"
    index.write_text(json.dumps(data))
    assert _refused(ck.validate_checkpoint, copy) == (
        f"{index}: shard '../../outside.safetensors' is not a file name in the checkpoint folder")


def test_short_read_while_streaming_is_refused(copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A shard cut after its header was checked: the reused read buffer's stale bytes never leak."""
    import torch

    shard = copy / "model.safetensors"
    header = st.read_header(shard)
    with open(shard, "r+b") as f:
        f.truncate(header.data_start + header.data_bytes // 2)
    monkeypatch.setattr(st, "read_header", lambda path: header)
    with pytest.raises(StageError) as e:
        list(ck.read_safetensors(copy, ("",), torch.float32))
    assert str(e.value).startswith(f"{shard}: truncated safetensors file (header says {header.data_bytes} data "
                                   "bytes, file has ")


# --- trust_remote_code: one policy ---------------------------------------------------------


def _with_auto_map(path: Path, file: str = "config.json") -> Path:
    data = json.loads((path / file).read_text())
    data["auto_map"] = {"AutoConfig": "configuration_evil.EvilConfig"}
    (path / file).write_text(json.dumps(data))
    return path


def test_hf_kwargs_policy() -> None:
    assert ck.hf_kwargs() == {"trust_remote_code": False, "local_files_only": True}
    assert ck.hf_kwargs(True) == {"trust_remote_code": True, "local_files_only": True}


def test_cnn_checkpoint_with_remote_code_refused(tmp_path: Path) -> None:
    from stages.lib.export.cnn import export_cnn, generate_tiny_cnn

    path = _with_auto_map(generate_tiny_cnn(tmp_path / "cnn", seed=0))
    want = (f"checkpoint {path} ships its own code (auto_map in config.json); set model.trust_remote_code: true "
            "to allow it")
    assert _refused(export_cnn, path, tmp_path / "out", {"dtype": "fp32"}) == want
    assert not (tmp_path / "out" / "vision.onnx").exists()
    assert _refused(ck.preflight_checkpoint, path) == want
    ck.preflight_checkpoint(path, trust_remote_code=True)  # allowed when the user says so


def test_every_loader_applies_the_policy(copy: Path) -> None:
    _with_auto_map(copy, "tokenizer_config.json")  # read by the tokenizer loaders only
    want = (f"checkpoint {copy} ships its own code (auto_map in tokenizer_config.json); set "
            "model.trust_remote_code: true to allow it")
    for fn in (ck.load_tokenizer, ck.load_processor):
        assert _refused(fn, copy) == want
    assert ck.load_image_processor(copy).merge_size == 2 and ck.load_config_hf(copy).model_type == "qwen2_vl"
    _with_auto_map(copy)
    want = want.replace("tokenizer_config.json", "config.json")
    for fn in (ck.load_config_hf, ck.load_image_processor, ck.load_tokenizer, ck.load_processor, ck.load_model):
        assert _refused(fn, copy) == want
    assert _refused(ck.load_vision, copy, "qwen2_vl") == want
    from stages.lib.export.decoder_load import load_decoder

    assert _refused(load_decoder, copy) == want


# --- the image processor alone, and preflight ----------------------------------------------


def test_image_processor_loads_without_tokenizer_files(copy: Path, tmp_path: Path) -> None:
    from stages.lib.parity.feeds import load_specs

    for name in ("tokenizer.json", "tokenizer_config.json"):
        (copy / name).write_text("{broken")
    proc = ck.load_image_processor(copy)
    assert proc.merge_size == 2 and len(proc.image_mean) == 3
    (tmp_path / "stage").mkdir()
    (tmp_path / "stage" / "checkpoint.json").write_text(json.dumps({"path": str(copy), "family": "qwen2_vl"}))
    specs = load_specs(tmp_path / "stage")
    assert specs.vision.patch_size == 14 and specs.vision.image_mean == tuple(proc.image_mean)
    bad_json = "Expecting property name enclosed in double quotes: line 1 column 2 (char 1)"
    assert _refused(ck.load_tokenizer, copy) == f"{copy / 'tokenizer_config.json'}: not valid JSON ({bad_json})"
    (copy / "tokenizer_config.json").unlink()
    assert _refused(ck.load_tokenizer, copy) == f"checkpoint {copy}: cannot load its tokenizer (JSONDecodeError: {bad_json})"


def test_preflight(tiny: Path, tmp_path: Path) -> None:
    ck.preflight_checkpoint(tiny)
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert _refused(ck.preflight_checkpoint, tmp_path / "llama") == (
        f"unsupported checkpoint {tmp_path / 'llama'} (config.json says llama); supported families: qwen2_vl, "
        "qwen2_5_vl, qwen3_vl, resnet")
    assert _refused(ck.preflight_checkpoint, tmp_path / "nowhere") == (
        f"checkpoint {tmp_path / 'nowhere'} does not exist (expected a local Hugging Face checkpoint folder)")


# --- images --------------------------------------------------------------------------------


@pytest.fixture
def images(tmp_path: Path) -> Path:
    from PIL import Image

    d = tmp_path / "imgs"
    d.mkdir()
    Image.fromarray((np.random.default_rng(0).random((64, 80, 3)) * 255).astype(np.uint8)).save(d / "ok.png")
    data = (d / "ok.png").read_bytes()
    (d / "half.png").write_bytes(data[: len(data) // 2])
    (d / "text.png").write_text("not an image")
    return d


def test_broken_images_are_named(images: Path) -> None:
    from stages.lib.qdq.calibset import read_image

    assert read_image(images / "ok.png", (56, 70)).shape == (56, 70, 3)
    assert _refused(read_image, images / "half.png", (56, 56)) == (
        f"{images / 'half.png'} is corrupt: truncated (image file is truncated); {EXPECT_RGB}")
    assert _refused(read_image, images / "text.png", (56, 56)) == (
        f"{images / 'text.png'} is corrupt or not an image (PIL cannot identify its format); {EXPECT_RGB}")


# the image has 5120 pixels: over twice the limit PIL raises its error, over the limit it warns
@pytest.mark.parametrize(("limit", "shown"), [(1000, 2000), (3000, 3000)])
def test_decompression_bomb_is_named(images: Path, limit: int, shown: int, monkeypatch: pytest.MonkeyPatch) -> None:
    from PIL import Image

    from stages.lib.qdq.calibset import folder_samples

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
    (images / "p.jsonl").write_text('{"prompt": "x", "image": "ok.png"}\n')
    msg = _refused(lambda: list(folder_samples(images, images / "p.jsonl", 1, [(56, 56)])))
    assert msg == (f"{images / 'ok.png'} is too large to decode safely (Image size (5120 pixels) exceeds limit of "
                   f"{shown} pixels, could be decompression bomb DOS attack.); "
                   f"{EXPECT_RGB}")
