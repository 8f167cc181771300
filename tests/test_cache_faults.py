"""Faults injected into the build graph: each must end in a clear outcome, nothing lost, no
untrusted entry used (issue: cache integrity)."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from tests.conftest import Cli


def _by_id(doc) -> dict:
    return {n["id"]: n for n in (doc["nodes"] if isinstance(doc, dict) else doc)}


def _popen(cli: Cli, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", *args], cwd=cli.tmp, env={**cli.env, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(pred, what: str, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_a_killed_worker_fails_its_node_only(cli: Cli):
    """`other` is SIGKILLed while `middle` runs beside it and `final@*` wait: the rest completes,
    the report and the lock file are written, the dead node says how it died."""
    cfg = cli.config()
    r = cli("build", str(cfg), "-j", "2", "--json", check=1,
            env={"FAKE_OTHER_DIE": "1", "FAKE_MIDDLE_SLEEP": "1"})
    doc = json.loads(r.stdout)
    nodes = _by_id(doc)
    assert nodes["other"]["status"] == "failed"
    assert "killed by SIGKILL" in nodes["other"]["error"] and "out of memory" in nodes["other"]["error"]
    assert {nodes[n]["status"] for n in ("source", "middle", "final@rtx3090", "final@rtx4090")} == {"ran"}
    assert "BrokenProcessPool" not in r.stderr and "Traceback" not in r.stderr
    assert (Path(doc["run_dir"]) / "report.md").is_file()
    lock = yaml.safe_load((cli.tmp / "artifacts" / "locks" / "fake.lock").read_text())
    assert set(lock["nodes"]) == {"source", "middle", "final@rtx3090", "final@rtx4090"}
    assert not list((cli.tmp / "artifacts" / "cache" / ".tmp").glob("*/out/other.txt"))


def test_gc_during_a_build_keeps_what_the_build_uses(cli: Cli):
    cfg = cli.config()
    build = _popen(cli, "build", str(cfg), "--json", env={"FAKE_MIDDLE_SLEEP": "3"})
    cache = cli.tmp / "artifacts" / "cache"
    _wait_for(lambda: any(cache.glob(".tmp/*/out/part1.txt")), "middle to start")
    gc = cli.json("gc")  # no lock file names anything yet: only the build's pins protect `source`
    assert gc["removed"] == [] and len(gc["pinned"]) >= 1
    out, err = build.communicate(timeout=120)
    assert build.returncode == 0, err
    doc = _by_id(json.loads(out))
    lock = yaml.safe_load((cli.tmp / "artifacts" / "locks" / "fake.lock").read_text())
    for nid, node in lock["nodes"].items():
        assert (cache / node["key"] / "manifest.json").is_file(), nid
        assert node["key"] == doc[nid]["key"]
    assert cli.json("gc")["removed"] == []  # now the lock file keeps them


def test_gc_refuses_with_an_unreadable_lock_file(cli: Cli):
    cfg = cli.config()
    cli("build", str(cfg))
    lock = cli.tmp / "artifacts" / "locks" / "fake.lock"
    lock.write_text("nodes: [1, 2\n")
    r = cli("gc", check=2)
    assert r.stderr.count("\n") == 1 and str(lock) in r.stderr and "removed nothing" in r.stderr
    assert all(n["cached"] for n in cli.json("plan", str(cfg)))


def test_concurrent_force_builds_of_a_shared_key(cli: Cli):
    cfg = cli.config()
    cli("build", str(cfg))
    procs = [_popen(cli, "build", str(cfg), "--force", "source", "--json", env={"FAKE_MIDDLE_SLEEP": "0.5"})
             for _ in range(2)]
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        assert "Traceback" not in err and json.loads(out)["result"] == "ok"
    plan = cli.json("plan", str(cfg))
    assert all(n["cached"] for n in plan)
    assert not list((cli.tmp / "artifacts" / "cache").glob(".corrupt/*"))


def test_force_names_are_validated(cli: Cli):
    r = cli("build", str(cli.config()), "--force", "nosuch", check=2)
    assert r.stderr.strip() == ("vlmforge: error: --force: no stage named 'nosuch' "
                                "(stages: source, middle, final, other)")
    assert not (cli.tmp / "artifacts" / "cache").exists()


def _entry(cli: Cli, doc: dict, nid: str) -> Path:
    return cli.tmp / "artifacts" / "cache" / _by_id(doc)[nid]["key"]


def test_malformed_manifests_and_memo_are_rebuilt_not_crashed_on(cli: Cli):
    cfg = cli.config()
    doc = cli.json("build", str(cfg))
    bad = {
        "middle": [],  # valid JSON, wrong shape
        "other": {"key": _by_id(doc)["other"]["key"]},  # no outputs table
        "source": {"key": _by_id(doc)["source"]["key"], "outputs": {"../../../etc/passwd": {"sha256": "0" * 64, "bytes": 1}}},
        "final@rtx3090": {"key": _by_id(doc)["final@rtx3090"]["key"], "outputs": {"final.bin": {"bytes": "x"}}},
    }
    for nid, manifest in bad.items():
        m = _entry(cli, doc, nid) / "manifest.json"
        m.chmod(0o644)
        m.write_text(json.dumps(manifest))
    (cli.tmp / "artifacts" / "cache" / ".hashmemo.json").write_text(json.dumps({"x": 5, "y": [1, 2, 3, 4, "nothex"]}))
    key = _by_id(doc)["final@rtx4090"]["key"]
    plan = _by_id(cli.json("plan", str(cfg)))
    for nid in bad:
        assert not plan[nid]["cached"]
    assert "damaged" in plan["source"]["reason"] and "unsafe output path" in plan["source"]["reason"]
    r = cli("show", key)  # an untouched entry still shows
    assert json.loads(r.stdout)["key"] == key
    again = _by_id(cli.json("build", str(cfg)))
    assert {again[n]["status"] for n in bad} == {"ran"}
    assert len(list((cli.tmp / "artifacts" / "cache" / ".corrupt").iterdir())) == len(bad)


def test_outputs_and_cache_are_read_only_and_views_are_links(cli: Cli):
    cfg = cli.config()
    doc = cli.json("build", str(cfg))
    view = cli.tmp / "artifacts" / "out" / "fake" / "middle"
    assert view.is_symlink() and view.resolve() == (_entry(cli, doc, "middle") / "out").resolve()
    for f in [*view.rglob("*"), *(cli.tmp / "artifacts" / "cache").glob("*/out/**/*")]:
        if f.is_file():
            assert not f.stat().st_mode & 0o222, f
            assert f.stat().st_nlink == 1, f  # never a second hard link (onnx-ir refuses those)
    # a folder a user made where a view would go is not ours: left alone, noted in the report
    mine = cli.tmp / "artifacts" / "out" / "fake" / "other"
    os.unlink(mine)
    mine.mkdir()
    (mine / "keep.txt").write_text("mine")
    again = cli.json("build", str(cfg), "--force", "other")
    assert (mine / "keep.txt").read_text() == "mine"
    assert any("not a view vlmforge made" in n for n in again["notes"])


def test_fsck_finds_bit_rot_under_an_unchanged_stat(cli: Cli):
    cfg = cli.config()
    doc = cli.json("build", str(cfg))
    target = _entry(cli, doc, "final@rtx4090") / "out" / "final.bin"
    memo_file = cli.tmp / "artifacts" / "cache" / ".hashmemo.json"
    target.chmod(0o644)
    data = bytearray(target.read_bytes())
    data[0] ^= 0x01
    target.write_bytes(bytes(data))
    target.chmod(0o444)
    # bit rot changes no stat field; simulate that by making the memo's row match the new stat
    memo = json.loads(memo_file.read_text())
    st = target.stat()
    row = memo[str(target.resolve())]
    memo[str(target.resolve())] = [st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns, row[4]]
    memo_file.write_text(json.dumps(memo))
    assert all(n["cached"] for n in cli.json("plan", str(cfg)))  # the stat memo cannot see it: fsck can
    r = cli("fsck", "--json", check=1)
    res = json.loads(r.stdout)
    key = _by_id(doc)["final@rtx4090"]["key"]
    assert list(res["damaged"]) == [key] and "sha256" in res["damaged"][key] and res["checked"] == 5
    assert cli("fsck", check=0).stdout.strip().endswith("0 damaged")
    again = _by_id(cli.json("build", str(cfg)))
    assert again["final@rtx4090"]["status"] == "ran" and again["middle"]["status"] == "cached"


def test_second_build_reads_cached_external_data(tmp_path: Path):
    """A > 256 MiB graph with external data: a later build re-reads the cached copy (it has one
    link, so onnx-ir trusts it) and the published view loads with onnx and onnx-ir."""
    import onnx
    import onnx_ir as ir

    cli = Cli(tmp_path, "tests.fake_stages.bigonnx,tests.fake_stages.readonnx")
    text = "name: big\nmodel: {generate: tiny, family: qwen2_vl}\ntargets: [rtx4090]\ncalibration: {samples: 300}\n"
    cfg = cli.config(text)
    first = _by_id(cli.json("build", str(cfg)))
    assert first["bigonnx"]["outputs"]["big.onnx.data"]["bytes"] == 300 << 20
    cli.config(text + "export: {opset: 21}\n")  # re-runs only the reader, on the cached graph
    second = _by_id(cli.json("build", str(cfg)))
    assert second["bigonnx"]["status"] == "cached" and second["readonnx"]["status"] == "ran"
    view = tmp_path / "artifacts" / "out" / "big" / "bigonnx" / "big.onnx"
    assert ir.load(view).graph.initializers["w"].const_value.numpy().shape == (300 << 18,)
    assert len(onnx.load(str(view), load_external_data=True).graph.initializer[0].raw_data) == 300 << 20
