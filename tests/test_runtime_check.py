"""The light device runtime (stages/lib/runtime): safe extraction of a package, and ``check`` on a
real package: the files' digests, the manifest, and the packaged gates (also through the vlmforge
CLI).

The package is the FP16 package of the tiny default (tests/runtime_package.py), built once per
test session. No GPU here: ``check`` runs the package's ONNX graphs with onnxruntime.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from stages.lib.runtime import archive, check_package
from stages.lib.runtime.errors import PackageError
from tests.runtime_package import REPO, cli

# --- safe extraction ----------------------------------------------------------------------------


def _tar(path: Path, bad: tarfile.TarInfo, data: bytes = b"") -> Path:
    with tarfile.open(path, "w") as tf:
        for name, content in (("pkg/manifest.json", b"{}"), ("pkg/a.txt", b"fine")):
            ti = tarfile.TarInfo(name)
            ti.size = len(content)
            tf.addfile(ti, io.BytesIO(content))
        tf.addfile(bad, io.BytesIO(data) if bad.isreg() else None)
    return path


def _member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "", data: bytes = b"x") -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type, ti.linkname = kind, link
    ti.size = len(data) if kind == tarfile.REGTYPE else 0
    return ti


@pytest.mark.parametrize("case", ["absolute", "dotdot", "symlink", "hardlink", "chardev", "blockdev", "fifo",
                                  "outside_top", "duplicate"])
def test_malicious_archive_is_refused_and_nothing_lands_outside(tmp_path: Path, case: str) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / "pwned"
    bad = {
        "absolute": _member(str(victim)),
        "dotdot": _member("pkg/../../outside/pwned"),
        "symlink": _member("pkg/link", tarfile.SYMTYPE, str(victim)),
        "hardlink": _member("pkg/hard", tarfile.LNKTYPE, str(victim)),
        "chardev": _member("pkg/tty", tarfile.CHRTYPE),
        "blockdev": _member("pkg/disk", tarfile.BLKTYPE),
        "fifo": _member("pkg/pipe", tarfile.FIFOTYPE),
        "outside_top": _member("other/pwned"),
        "duplicate": _member("pkg/a.txt", data=b"overwritten"),
    }[case]
    tar = _tar(tmp_path / f"{case}.tar", bad, b"x" if bad.isreg() and case != "duplicate" else b"overwritten")
    dest = tmp_path / "dest"
    with pytest.raises(PackageError) as e:
        archive.extract(tar, dest)
    msg = str(e.value)
    assert "\n" not in msg and "refused member" in msg and repr(bad.name) in msg, msg
    assert not victim.exists() and list(outside.iterdir()) == []
    # refused before a byte is written: no destination, no temporary folder, nothing beside them
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["outside", tar.name])


def test_good_archive_extracts_beside_and_refuses_an_existing_destination(tmp_path: Path) -> None:
    tar = _tar(tmp_path / "ok.tar", _member("pkg/sub/b.txt", data=b"hi"), b"hi")
    root = archive.extract(tar, tmp_path / "dest")
    assert root == tmp_path / "dest" / "pkg" and (root / "sub" / "b.txt").read_bytes() == b"hi"
    assert sorted(p.name for p in (tmp_path / "dest").iterdir()) == ["pkg"]  # the temp folder is gone
    with pytest.raises(PackageError, match="already exists"):
        archive.extract(tar, tmp_path / "dest")
    (tmp_path / "junk.tar").write_bytes(b"not a tar at all" * 100)
    with pytest.raises(PackageError, match="not a readable tar"):
        archive.extract(tmp_path / "junk.tar", tmp_path / "d2")


# --- check on a real package --------------------------------------------------------------------


def test_check_passes_on_the_good_package_with_onnxruntime(package: Path) -> None:
    res = check_package(package, "onnxruntime")
    assert res.exit_code == 0, res.message
    by = {g.graph: g for g in res.graphs}
    assert set(by) == {"vision", "decoder", "generation"}
    assert by["vision"].status == by["decoder"].status == "pass" and by["vision"].precision == "fp16"
    assert by["vision"].figures["cosine"] >= 0.9999 and by["decoder"].figures["top1"] == 1.0
    assert [c["name"] for c in by["vision"].gates] == ["vision.fp16.onnxruntime.cosine",
                                                         "vision.fp16.onnxruntime.norm_ratio"]
    assert by["generation"].figures["tokens"] == 1.0  # fp16 has no token gate: measured, "ungated"
    from stages.lib.packaging import read_member

    assert res.files is not None and res.files.checked == len(json.loads(read_member(package, "manifest.json"))["files"])
    r = cli("check", str(package), "--backend", "onnxruntime", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["passed"] is True and doc["compat"]["backend"] == "onnxruntime"


def test_default_backend_without_a_gpu_is_onnxruntime_and_says_why(package: Path) -> None:
    r = cli("check", str(package))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "engines not run: tensorrt_rtx backend needs an NVIDIA GPU with driver; none found" in r.stdout


def test_one_byte_changed_in_any_packaged_file_fails_naming_it(unpacked: Path) -> None:
    files = json.loads((unpacked / "manifest.json").read_text())["files"]
    assert len(files) >= 15
    for rel in files:
        p = unpacked / rel
        orig = p.read_bytes()
        data = bytearray(orig)
        data[len(data) // 2] ^= 0x01
        p.write_bytes(bytes(data))
        res = check_package(unpacked, "onnxruntime")
        assert res.exit_code == 1 and f"{rel}: sha256 differs" in res.message, (rel, res.message)
        p.write_bytes(orig)
    assert check_package(unpacked, "onnxruntime").exit_code == 0  # all restored
    victim = "engines/decoder.engine"
    with open(unpacked / victim, "r+b") as f:
        f.seek(100)
        b = f.read(1)
        f.seek(100)
        f.write(bytes([b[0] ^ 0xFF]))
    r = cli("check", str(unpacked), "--backend", "onnxruntime")
    assert r.returncode == 1 and f"{victim}: sha256 differs" in r.stdout + r.stderr


def test_unlisted_missing_resized_files_and_unknown_format(unpacked: Path) -> None:
    (unpacked / "engines" / "extra.engine").write_bytes(b"smuggled")
    res = check_package(unpacked, "onnxruntime")
    assert res.exit_code == 1 and "engines/extra.engine: not listed in the manifest" in res.message
    (unpacked / "engines" / "extra.engine").unlink()
    (unpacked / "tokenizer" / "tokenizer.json").unlink()
    res = check_package(unpacked, "onnxruntime")
    assert res.exit_code == 1 and "tokenizer/tokenizer.json: missing" in res.message
    m = json.loads((unpacked / "manifest.json").read_text())
    (unpacked / "manifest.json").write_text(json.dumps({**m, "format": 2}))
    res = check_package(unpacked, "onnxruntime")
    assert res.exit_code == 2 and "package format 2; this runtime reads format 1" in res.message


def _rewrite(pkg_dir: Path, rel: str, data: bytes) -> None:
    """Change a packaged file *and* its manifest entry (a consistent, re-digested package)."""
    import hashlib

    (pkg_dir / rel).write_bytes(data)
    m = json.loads((pkg_dir / "manifest.json").read_text())
    m["files"][rel] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (pkg_dir / "manifest.json").write_text(json.dumps(m))


def test_the_packaged_gates_decide(unpacked: Path) -> None:
    probe = json.loads((unpacked / "probe" / "probe.json").read_text())
    probe["gates"]["vision"]["gate"]["cosine"] = 1.0  # no FP16 graph is bit-exact: this gate misses
    probe["gates"]["decoder"]["gate"]["tokens"] = 1.0  # generation is gated by the decoder's tokens
    _rewrite(unpacked, "probe/probe.json", json.dumps(probe).encode())
    res = check_package(unpacked, "onnxruntime")
    assert res.exit_code == 1 and "gate missed on onnxruntime: vision.fp16.onnxruntime.cosine " in res.message
    assert res.message.endswith("(needs >= 1)")
    by = {g.graph: g for g in res.graphs}
    assert by["vision"].status == "fail" and by["decoder"].status == "pass" and by["generation"].status == "pass"
    r = cli("check", str(unpacked), "--backend", "onnxruntime")
    assert r.returncode == 1 and "vision.fp16.onnxruntime.cosine" in r.stdout and "FAIL" in r.stderr


def test_register_plugs_into_the_vlmforge_cli(package: Path) -> None:
    """pipeline.cli loads command modules by name (VLMFORGE_COMMAND_MODULES here; the stage
    layer's COMMAND_MODULES once the lead lists stages.lib.runtime.cli there)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "VLMFORGE_COMMAND_MODULES": "stages.lib.runtime.cli"}
    r = subprocess.run([sys.executable, "-m", "pipeline.cli", "check", str(package), "--backend", "onnxruntime",
                        "--json"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["passed"] is True
    r = subprocess.run([sys.executable, "-m", "pipeline.cli", "generate", "--help"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "--max-new-tokens" in r.stdout
