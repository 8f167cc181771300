"""Editing a user's checkpoint in place re-keys exactly the stages that read what changed, and
an unchanged checkpoint is not re-read on a rebuild (stat memo)."""

import json
from pathlib import Path

import pytest

from pipeline.cache import CacheStore
from pipeline.config_io import load_config
from pipeline.graph import build_graph, load_stages
from pipeline.hashing import HashMemo
from pipeline.keys import cache_key, key_material
from pipeline.runner import Planner
from pipeline.targets import load_catalog

READ_ALL = {"checkpoint", "reference", "calibrate", "quantize@rtx3090", "quantize@rtx4090",
            "verify@rtx3090", "verify@rtx4090"}
READ_WEIGHTS = READ_ALL | {"export_vision", "export_decoder"}  # also what reads the processor
PACKAGE = {"package@rtx3090", "package@rtx4090"}  # ships the tokenizer and processor files


@pytest.fixture(scope="module")
def user_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from stages.lib.checkpoints.tiny import generate_tiny

    return generate_tiny("qwen2_5_vl", tmp_path_factory.mktemp("ckpt") / "user")


def _setup(tmp: Path, ckpt: Path) -> tuple:
    p = tmp / "user.yaml"
    p.write_text(f"model: {{checkpoint: {ckpt}}}\ntargets: [rtx3090, rtx4090]\n")
    cfg = load_config(p)
    cat = load_catalog()
    return cfg, build_graph(load_stages(), [cat[t] for t in cfg.targets])


def _keys(cfg, nodes) -> dict[str, str]:
    same_upstream = {"x": {"sha256": "0" * 64, "bytes": 1}}  # isolate each node's own key material
    return {n.id: cache_key(key_material(n, cfg, {d: same_upstream for d in n.deps}, HashMemo(None))) for n in nodes}


def _rewrite_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data, indent=2))


@pytest.mark.parametrize("what", ["weights", "tokenizer", "processor"])
def test_an_in_place_edit_rekeys_exactly_its_readers(tmp_path: Path, user_ckpt: Path, what: str):
    import shutil

    ckpt = Path(shutil.copytree(user_ckpt, tmp_path / "ckpt"))
    cfg, nodes = _setup(tmp_path, ckpt)
    before = _keys(cfg, nodes)
    if what == "weights":  # a fine-tune saved over the folder: same names, same sizes, other bytes
        shard = ckpt / "model.safetensors"
        data = bytearray(shard.read_bytes())
        data[-3] ^= 0x40
        shard.write_bytes(bytes(data))
        expected = READ_WEIGHTS
    elif what == "tokenizer":
        _rewrite_json(ckpt / "tokenizer_config.json", lambda d: d.update(model_max_length=1234))
        expected = READ_ALL | PACKAGE
    else:
        _rewrite_json(ckpt / "preprocessor_config.json", lambda d: d.update(image_mean=[0.5, 0.5, 0.5]))
        expected = READ_WEIGHTS | PACKAGE
    after = _keys(cfg, nodes)
    changed = {n for n in before if before[n] != after[n]}
    assert changed == expected


def test_a_rebuild_does_not_rehash_an_unchanged_checkpoint(tmp_path: Path, user_ckpt: Path):
    cfg, nodes = _setup(tmp_path, user_ckpt)
    root = tmp_path / "cache"
    first = CacheStore(root)
    Planner(cfg, nodes, first).plan()
    size = sum(p.stat().st_size for p in user_ckpt.iterdir() if p.is_file())
    assert first.memo.hashed_bytes >= 0.9 * size  # read once (the first plan)
    again = CacheStore(root)  # a new process: the memo comes from disk
    states = Planner(cfg, nodes, again).plan()
    assert again.memo.hashed_bytes == 0
    assert {s.node.id: s.key for s in states}["checkpoint"] is not None


def test_a_write_that_keeps_size_and_mtime_is_still_seen(tmp_path: Path, user_ckpt: Path):
    import os
    import shutil

    ckpt = Path(shutil.copytree(user_ckpt, tmp_path / "ckpt"))
    memo = HashMemo(tmp_path / "memo.json")
    f = ckpt / "tokenizer.json"
    old = memo.sha256(f)
    st = f.stat()
    text = f.read_text()
    f.write_text(text.replace('"', "'", 1) if '"' in text else text + " ")
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))  # a tool that restores the mtime
    assert f.stat().st_size == st.st_size and f.stat().st_mtime_ns == st.st_mtime_ns
    assert memo.sha256(f) != old  # ctime moved: re-hashed


@pytest.mark.slow
def test_fine_tune_saved_over_the_folder_rebuilds_the_export(tmp_path: Path, user_ckpt: Path):
    """The defect this guards: the checkpoint stage re-ran, wrote the same checkpoint.json, and
    the exports were cache hits built from the old weights."""
    import shutil

    from tests.conftest import Cli

    ckpt = Path(shutil.copytree(user_ckpt, tmp_path / "ckpt"))
    cli = Cli(tmp_path, stages="stages.checkpoint,stages.export_vision")
    cfg = cli.config(f"name: ft\nmodel: {{checkpoint: {ckpt}}}\ntargets: [rtx4090]\n")
    first = {n["id"]: n for n in cli.json("build", str(cfg))["nodes"]}
    shard = ckpt / "model.safetensors"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0x40
    shard.write_bytes(bytes(data))
    second = {n["id"]: n for n in cli.json("build", str(cfg))["nodes"]}
    assert second["export_vision"]["status"] == "ran"
    assert second["export_vision"]["key"] != first["export_vision"]["key"]
