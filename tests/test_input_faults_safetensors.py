"""Bad safetensors shards: one StageError line naming the file and what was expected, no
traceback. Real inputs: a generated tiny checkpoint's shard cut short or with trailing bytes,
foreign files and inconsistent headers, an index naming an absent tensor or a shard outside the
folder, and a shard cut while it is streamed."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from pipeline.stage import StageError
from stages.lib.checkpoints import local as ck
from stages.lib.checkpoints import safetensors_check as st
from tests.input_faults_common import _refused

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
