"""package@T: one deterministic archive per target (format: stages/lib/packaging/layout.py).

The stage runs on hand-made build folders in the documented formats (tests/package_folders.py:
engine sidecars, io specs, reference.npz, a checkpoint's tokenizer files): the layout and the
manifest's digests, a normalised tar, runtime.json, the probe set with its gates, the variants
(no onnx/, weight-stripped engines, vision-only and bring-your-own models) and the refusals.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest

from pipeline.stage import StageError
from pipeline.targets import load_catalog
from stages.lib.packaging import check_archive, layout, load_probe, read_member, write_tar
from stages.lib.packaging.archive import Member
from stages.lib.runtime.archive import extract  # the one safe extractor (the device side)
from stages.package import STAGE
from tests.package_folders import (
    GRAPHS,
    TARGET,
    TOKENIZER,
    _build,
    _cfg,
    _checkpoint,
    _names,
    _run,
    _spec,
    _write,
)


@pytest.fixture
def build(tmp_path: Path) -> dict[str, Path]:
    return _build(tmp_path / "build")


def test_declaration() -> None:
    assert (STAGE.name, STAGE.version, STAGE.per_target) == ("package", "3", True)
    assert set(STAGE.deps) == {"engine", "quantize", "checkpoint", "reference", "verify"}
    assert STAGE.outputs == ("package.tar", "manifest.json") and STAGE.deliver == ("package.tar",)
    p = STAGE.params(_cfg(), load_catalog()[TARGET])
    assert p["name"] == "pk" and p["onnx"] is True and p["precision"] == {"vision": "fp8", "decoder": "fp8"}
    assert p["gates"]["fp8"]["cosine"] == 0.99 and json.loads(json.dumps(p)) == p


def test_external_declares_tokenizer_processor_and_config_not_weights(tmp_path: Path) -> None:
    model = _checkpoint(tmp_path) / "model"
    assert STAGE.external is not None
    names = sorted(p.name for p in STAGE.external(_cfg(model={"checkpoint": str(model)})))
    assert names == sorted(["config.json", *TOKENIZER])  # model.safetensors is not read
    assert STAGE.external(_cfg()) == []  # a generated checkpoint reaches the stage through its entry


def test_layout_and_manifest_digests(build: dict[str, Path], tmp_path: Path) -> None:
    res, out = _run(build, tmp_path / "out")
    tar = out / "package.tar"
    assert check_archive(tar) == []
    top = f"pk-{TARGET}"
    want = {"manifest.json", "runtime.json", "probe/probe.npz", "probe/probe.json",
            *(f"engines/{g}{s}" for g in GRAPHS for s in (".engine", ".engine.json", ".layers.json")),
            *(f"onnx/{g}.onnx" for g in GRAPHS), "onnx/vision.json", "onnx/decoder.json",
            *(f"tokenizer/{n}" for n in TOKENIZER)}
    dirs = {top, *(f"{top}/{d}" for d in ("engines", "onnx", "probe", "tokenizer"))}
    assert set(_names(tar)) == {f"{top}/{w}" for w in want} | dirs
    inner = read_member(tar, "manifest.json")
    assert inner == (out / "manifest.json").read_bytes()  # the stage's manifest.json is the tar's, byte for byte
    m = json.loads(inner)
    assert tuple(m) == layout.MANIFEST_KEYS and m["format"] == layout.FORMAT_VERSION == 1
    assert set(m["files"]) == want - {"manifest.json"}
    pkg = extract(tar, tmp_path / "x")
    for rel, d in m["files"].items():
        data = (pkg / rel).read_bytes()
        assert d == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}, rel
    assert (pkg / "engines/vision.engine").read_bytes() == (build["engine"] / "vision.engine").read_bytes()
    assert m["target"] == {"name": TARGET, "sm": "8.9", "builder": "tensorrt-rtx", "builder_version": "1.7.1.116"}
    assert m["compat"] == {"hardware_compatible": False, "version_compatible": False, "weight_stripped": False}
    assert m["precision"] == {"vision": "fp8", "decoder": "fp8"} and m["graphs"] == list(GRAPHS)
    assert m["parity"]["passed"] is True and m["created_by"].startswith("vlmforge ")
    assert m["config_digest"] == hashlib.sha256(json.dumps(STAGE.params(_cfg(), load_catalog()[TARGET]),
                                                           sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    assert res.metrics["bytes"] == tar.stat().st_size and res.metrics["sha256"] == hashlib.sha256(tar.read_bytes()).hexdigest()


def test_tar_is_deterministic_and_normalised(build: dict[str, Path], tmp_path: Path) -> None:
    _, a = _run(build, tmp_path / "a")
    for f in (p for p in build["engine"].rglob("*") if p.is_file()):
        os.utime(f, (1e9, 1e9))  # other mtimes, same content
    _, b = _run(build, tmp_path / "b")
    assert (a / "package.tar").read_bytes() == (b / "package.tar").read_bytes()
    names = _names(a / "package.tar")
    assert names == sorted(names)
    with tarfile.open(a / "package.tar") as tf:
        for ti in tf:
            assert ti.isfile() or ti.isdir(), ti.name  # no links, devices, fifos
            assert not ti.name.startswith("/") and ".." not in ti.name.split("/")
            assert (ti.mtime, ti.uid, ti.gid, ti.uname, ti.gname) == (0, 0, 0, "", "")
            assert ti.mode == (0o755 if ti.isdir() else 0o644)


def test_runtime_json_has_io_specs_rope_and_tokens(build: dict[str, Path], tmp_path: Path) -> None:
    _, out = _run(build, tmp_path / "out")
    r = json.loads(read_member(out / "package.tar", "runtime.json"))
    assert tuple(r) == layout.RUNTIME_KEYS and r["family"] == "qwen2_5_vl"
    assert [i["name"] for i in r["graphs"]["decoder"]["inputs"]] == ["inputs_embeds", "attention_mask", "position_ids"]
    assert r["graphs"]["embed"]["inputs"][0] == {"name": "input_ids", "dtype": "float16", "shape": ["batch", "seq", 64]}
    assert r["graphs"]["vision"]["profile"] == {"patches": {"min": 16, "max": 2048}}
    assert r["rope"] == {"mrope_section": [2, 3, 3], "mrope_interleaved": False, "rope_theta": 1e6, "rope_type": "default"}
    from stages.lib.hostside.text import TextSpec
    from stages.lib.hostside.vision import VisionSpec

    assert TextSpec(**r["text"]).image_token_id == 510  # decoder.json's host spec, as is
    assert r["vision"] == {"family": "qwen2_5_vl", "patch_size": 14, "merge_size": 2}
    assert r["preprocess"] is None and VisionSpec.from_dict({**r["vision"], "temporal_patch_size": 2, "in_channels": 3, "head_dim": 16,
                                 "rope_theta": 1e4}).merge_size == 2
    assert r["generation"] == {"eos_token_id": [507, 505], "do_sample": False}
    assert r["special_tokens"] == {"bos_token": 505, "eos_token": 507, "pad_token": 505, "unk_token": 0,
                                   "image_token": 510, "video_token": 511, "vision_start_token": 508,
                                   "vision_end_token": 509}
    assert r["added_tokens"]["<|im_end|>"] == 507 and r["stop_token_ids"] == [505, 507]


def test_probe_set_round_trips_with_gates(build: dict[str, Path], tmp_path: Path) -> None:
    _, out = _run(build, tmp_path / "out", cfg=_cfg(gates={"fp8": {"cosine": 0.97}}))
    pkg = extract(out / "package.tar", tmp_path / "x")
    assert (pkg / "probe/probe.npz").read_bytes() == (build["reference"] / "reference.npz").read_bytes()
    got = load_probe(pkg / "probe/probe.npz")
    with np.load(build["reference"] / "reference.npz") as z:
        for key in z.files:
            i, name = key.split(".", 1)
            np.testing.assert_array_equal(got[int(i[1:])][name], z[key])
    p = json.loads((pkg / "probe/probe.json").read_text())
    assert p["outputs"] == ["deepstack.0", "generated", "logits", "vision_features"]
    assert p["inputs"] == ["image_grid_thw", "input_ids", "pixel_values"]
    assert p["arrays"]["s0.pixel_values"] == {"dtype": "float32", "shape": [2, 6]}
    assert p["gates"]["vision"]["precision"] == "fp8" and p["gates"]["vision"]["gate"]["cosine"] == 0.97
    assert set(p["gates"]) == {"vision", "decoder"} and p["reference"]["samples"][1]["seq_len"] == 3


def test_no_onnx_variant_omits_onnx(build: dict[str, Path], tmp_path: Path) -> None:
    res, out = _run(build, tmp_path / "out", onnx=False)
    assert not any("/onnx" in n for n in _names(out / "package.tar"))
    m = json.loads((out / "manifest.json").read_text())
    assert m["onnx"] == {"included": False, "refit_source": False} and not any(k.startswith("onnx/") for k in m["files"])
    assert "onnx/ left out (package.onnx: false)" in res.notes and check_archive(out / "package.tar") == []


def test_weight_stripped_engines_always_ship_onnx(tmp_path: Path) -> None:
    build = _build(tmp_path / "b", applied=("STRIP_PLAN", "REFIT_IDENTICAL"))
    res, out = _run(build, tmp_path / "out", onnx=False)
    m = json.loads((out / "manifest.json").read_text())
    assert m["compat"]["weight_stripped"] is True and m["onnx"] == {"included": True, "refit_source": True}
    assert "onnx/decoder.onnx" in m["files"] and any("refit" in n for n in m["notes"])


def test_vision_only_and_byo_models(tmp_path: Path) -> None:
    build = _build(tmp_path / "b", graphs=("vision",))
    _write(build["checkpoint"] / "checkpoint.json", {"path": None, "family": "byo"})  # bring-your-own ONNX
    cnn = {**_spec(["x"]), "layout": "NCHW", "preprocess": {"mean": [0.5] * 3, "std": [0.2] * 3}}
    _write(build["quantize"] / "vision.json", cnn)
    _, out = _run(build, tmp_path / "out")
    m = json.loads((out / "manifest.json").read_text())
    assert m["graphs"] == ["vision"] and m["precision"] == {"vision": "fp8"} and m["family"] == "byo"
    assert not any(k.startswith("tokenizer/") for k in m["files"])
    r = json.loads(read_member(out / "package.tar", "runtime.json"))
    assert (r["text"], r["rope"], r["special_tokens"], list(r["graphs"])) == (None, None, {}, ["vision"])
    assert r["vision"] is None and r["preprocess"] == {"layout": "NCHW", "preprocess": cnn["preprocess"]}


def test_refuses_damaged_engines_and_other_targets(build: dict[str, Path], tmp_path: Path) -> None:
    car = json.loads((build["engine"] / "decoder.engine.json").read_text())
    _write(build["engine"] / "decoder.engine.json", {**car, "sha256": "0" * 64})
    with pytest.raises(StageError, match="decoder.engine: sha256 differs"):
        _run(build, tmp_path / "a")
    other = _build(tmp_path / "o", target="rtx5090")
    with pytest.raises(StageError, match="built for rtx5090, not rtx4090"):
        _run(other, tmp_path / "b")
    (other["engine"] / "vision.engine").unlink()
    with pytest.raises(StageError, match="no vision.engine"):
        _run(other, tmp_path / "c")


def test_archive_checks_and_member_paths(tmp_path: Path) -> None:
    for bad in ("/etc/passwd", "../x", "a//b", "./a", "a\\b"):
        with pytest.raises(ValueError, match="must be relative"):
            Member(bad, data=b"")
    with pytest.raises(ValueError, match="duplicate"):
        write_tar(tmp_path / "d.tar", "top", [Member("a", data=b"1"), Member("a", data=b"2")])
    # a tar with a link and a file the manifest does not describe: the reader's checks name both
    t = tmp_path / "bad.tar"
    with tarfile.open(t, "w") as tf:
        for name, data in (("top/manifest.json", json.dumps({"format": 1, "files": {}}).encode()), ("top/x", b"x")):
            ti = tarfile.TarInfo(name)
            ti.size, ti.mode = len(data), 0o644
            tf.addfile(ti, io.BytesIO(data))
        link = tarfile.TarInfo("top/link")
        link.type, link.linkname, link.mode = tarfile.SYMTYPE, "/etc/passwd", 0o644
        tf.addfile(link)
    problems = check_archive(t)
    assert any("top/link: not a plain file" in p for p in problems)
    assert "x: in the tar, not in the manifest" in problems
