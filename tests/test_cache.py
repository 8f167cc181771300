import json
import multiprocessing as mp
import os
from pathlib import Path

from pipeline.cache import CacheStore
from pipeline.housekeeping import gc


def _commit(store: CacheStore, key: str, files: dict[str, str]) -> dict:
    tmp = store.begin(key)
    for rel, text in files.items():
        (tmp / "out" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp / "out" / rel).write_text(text)
    return store.commit(key, tmp, {"node": "n", "metrics": {"m": 1}})


def _writable(p: Path) -> Path:
    """Committed files are read-only (as root the bits do not stop a write; as a user they do)."""
    assert not os.stat(p).st_mode & 0o222
    p.chmod(0o644)
    return p


def test_commit_then_lookup(tmp_path: Path):
    store = CacheStore(tmp_path)
    m = _commit(store, "k1", {"a.txt": "hello", "d/b.txt": "world"})
    assert m["outputs"]["a.txt"]["bytes"] == 5
    found = store.lookup("k1")
    assert found.hit and found.manifest["metrics"] == {"m": 1}
    assert (store.out_dir("k1") / "d" / "b.txt").read_text() == "world"
    assert not list((tmp_path / ".tmp").iterdir())  # temp folder renamed away


def test_corrupt_output_is_detected_and_quarantined(tmp_path: Path):
    store = CacheStore(tmp_path)
    _commit(store, "k2", {"a.txt": "hello"})
    store.memo.save()
    _writable(store.out_dir("k2") / "a.txt").write_text("hellO")  # same size, other bytes
    found = CacheStore(tmp_path).lookup("k2")  # a fresh process's view
    assert not found.hit and "sha256" in found.reason
    assert not store.entry("k2").exists() and list((tmp_path / ".corrupt").iterdir())


def test_truncated_missing_and_extra_files_are_detected(tmp_path: Path):
    store = CacheStore(tmp_path)
    _commit(store, "k3", {"a.txt": "hello"})
    _writable(store.out_dir("k3") / "a.txt").write_text("he")
    assert "bytes" in store.lookup("k3").reason
    _commit(store, "k4", {"a.txt": "hello"})
    (store.out_dir("k4") / "a.txt").unlink()
    assert "missing" in store.lookup("k4").reason
    _commit(store, "k5", {"a.txt": "hello"})
    (store.out_dir("k5") / "stray.bin").write_text("x")
    assert "unrecorded" in store.lookup("k5").reason


def test_half_written_entry_is_never_trusted(tmp_path: Path):
    store = CacheStore(tmp_path)
    # A builder killed before its rename leaves only a temp folder: not an entry at all.
    tmp = store.begin("k6")
    (tmp / "out" / "a.txt").write_text("partial")
    assert store.lookup("k6").reason == "not built"
    # An entry folder without a parseable manifest (e.g. copied by hand) is quarantined.
    (tmp_path / "k7" / "out").mkdir(parents=True)
    (tmp_path / "k7" / "manifest.json").write_text("{not json")
    assert "unreadable manifest" in store.lookup("k7").reason
    # A manifest of another key is not trusted either.
    _commit(store, "k8", {"a.txt": "x"})
    m = json.loads((tmp_path / "k8" / "manifest.json").read_text())
    os.rename(tmp_path / "k8", tmp_path / "k9")
    assert m["key"] == "k8" and not store.lookup("k9").hit


KEEP, DROP = "a" * 32, "b" * 32


def test_gc_keeps_referenced_and_removes_dead_temp(tmp_path: Path):
    store = CacheStore(tmp_path)
    _commit(store, KEEP, {"a": "1"})
    _commit(store, DROP, {"a": "2"})
    dead = tmp_path / ".tmp" / "k.999999999.abcd"
    dead.mkdir(parents=True)
    mine = tmp_path / "my-notes"  # not named like a key: not vlmforge's, never deleted
    mine.mkdir()
    res = gc(store, {KEEP})
    assert res.removed == [DROP] and dead.name in res.stale
    assert store.lookup(KEEP).hit and not store.entry(DROP).exists() and not dead.exists() and mine.is_dir()


def _builder(root: str, key: str, barrier, results) -> None:
    from filelock import FileLock

    store = CacheStore(Path(root))
    barrier.wait()
    with FileLock(str(store.lock_path(key))) if store.lock_path(key).parent.mkdir(parents=True, exist_ok=True) is None else None:
        if store.lookup(key).hit:
            results.put("cached")
            return
        tmp = store.begin(key)
        for i in range(50):
            (tmp / "out" / f"f{i}.txt").write_text(str(i) * 1000)
        store.commit(key, tmp, {"node": "n"})
        results.put("built")


def test_concurrent_builders_of_one_key(tmp_path: Path):
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(4), ctx.Queue()
    procs = [ctx.Process(target=_builder, args=(str(tmp_path), "shared", barrier, results)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    outcomes = sorted(results.get() for _ in procs)
    assert outcomes == ["built", "cached", "cached", "cached"]
    found = CacheStore(tmp_path).lookup("shared")
    assert found.hit and len(found.manifest["outputs"]) == 50


def test_gc_treats_a_zombie_builder_as_dead(tmp_path: Path):
    import subprocess
    import sys

    store = CacheStore(tmp_path)
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    import time

    import psutil

    deadline = time.time() + 30
    while time.time() < deadline:  # exited but not reaped: a zombie, as a killed builder in a container stays
        if psutil.Process(child.pid).status() == psutil.STATUS_ZOMBIE:
            break
        time.sleep(0.05)
    tmp = tmp_path / ".tmp" / f"k.{child.pid}.abcd"
    tmp.mkdir(parents=True)
    live = tmp_path / ".tmp" / f"k.{os.getpid()}.ef01"
    live.mkdir()
    res = gc(store, set())
    assert tmp.name in res.stale and live.name not in res.stale and live.exists()
    child.wait()
