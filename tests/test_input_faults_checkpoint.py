"""Bad checkpoint folders: one StageError line naming the file and what was expected, no
traceback, nothing followed out of the checkpoint folder. Real inputs: a generated tiny
checkpoint, real symlinks, a hub-cache layout, a config or tokenizer config that ships its own
code, broken tokenizer files, an unsupported family. (Broken shards:
tests/test_input_faults_safetensors.py; broken images: tests/test_input_faults_images.py.)"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from stages.lib.checkpoints import local as ck
from tests.input_faults_common import _refused

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
