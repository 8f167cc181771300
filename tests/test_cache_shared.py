"""The cache shared by a farm: the commit protocol holds without any lock, and gc on one host
never judges another host's temp folders and pins by a pid that means nothing there."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import time
from pathlib import Path

from pipeline.cache import CacheStore
from pipeline.housekeeping import gc, live_pins
from pipeline.liveness import FOREIGN_GRACE_S, host_tag, pin_alive, tmp_alive, tmp_name

KEY = "ab" * 16


def _commit_without_lock(root: str, barrier: object, tag: str, conn: object) -> None:
    """What a worker does, minus the per-key lock (unreliable on NFS): write, wait for the other
    writer, commit at the same moment."""
    store = CacheStore(Path(root))
    tmp = store.begin(KEY)
    (tmp / "out" / "engine.bin").write_bytes(b"same bytes from either writer" * 1000)
    barrier.wait()  # type: ignore[attr-defined]
    manifest = store.commit(KEY, tmp, {"node": "engine@x", "writer": tag})
    conn.send((manifest["writer"], tmp.exists()))  # type: ignore[attr-defined]


def test_two_writers_of_one_key_at_once_without_locks_leave_one_whole_entry(tmp_path: Path) -> None:
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(2)
    pipes = [ctx.Pipe(duplex=False) for _ in range(2)]
    procs = [ctx.Process(target=_commit_without_lock, args=(str(tmp_path), barrier, tag, send))
             for tag, (_, send) in zip(("a", "b"), pipes, strict=True)]
    for p in procs:
        p.start()
    got = [recv.recv() for recv, _ in pipes]
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    winners = {w for w, _ in got}
    assert len(winners) == 1  # the loser returns the entry that won, not its own copy
    assert [left for _, left in got] == [False, False]  # neither temp folder is left behind
    store = CacheStore(tmp_path)
    found = store.lookup(KEY, rehash=True)
    assert found.hit and found.manifest is not None and found.manifest["writer"] in winners
    assert store.keys() == [KEY]
    assert not list((tmp_path / ".tmp").iterdir())


def test_temp_folders_and_pins_carry_the_host(tmp_path: Path) -> None:
    name = tmp_name(KEY)
    assert name.split(".")[0] == KEY and name.split(".")[1] == str(os.getpid()) and name.endswith("." + host_tag())
    folder = tmp_path / name
    folder.mkdir()
    assert tmp_alive(folder)  # ours, and this process runs
    store = CacheStore(tmp_path / "cache")
    with store.pinning():
        store.pin(KEY)
        (pin,) = (tmp_path / "cache" / ".pins").glob("*.json")
        assert pin.name.split(".")[3] == host_tag() and pin_alive(pin)


def test_gc_keeps_another_hosts_temp_folder_and_pin_while_they_are_young(tmp_path: Path) -> None:
    store = CacheStore(tmp_path)
    entry = store.entry(KEY) / "out"
    entry.mkdir(parents=True)
    (store.entry(KEY) / "manifest.json").write_text(json.dumps({"key": KEY, "outputs": {}}))
    pins = tmp_path / ".pins"
    pins.mkdir()
    # pid 1 on this host would be judged by its start time; on another host it is judged by age
    young_pin = pins / "1.1000.deadbeef.other-host.json"
    young_pin.write_text(json.dumps([KEY]))
    young_tmp = tmp_path / ".tmp" / f"{'cd' * 16}.1.deadbeef.other-host"
    old_tmp = tmp_path / ".tmp" / f"{'ef' * 16}.1.deadbeef.other-host"
    for t in (young_tmp, old_tmp):
        (t / "out").mkdir(parents=True)
    stale = time.time() - FOREIGN_GRACE_S - 60
    os.utime(old_tmp, (stale, stale))
    assert live_pins(store, drop_dead=False) == {KEY}
    res = gc(store, keep=set())
    assert res.removed == [] and res.pinned == [KEY]
    assert young_tmp.is_dir() and not old_tmp.exists()
    os.utime(young_pin, (stale, stale))  # the other host's build is long gone
    res = gc(store, keep=set())
    assert res.removed == [KEY] and not young_pin.exists()
