"""The build graph end to end through the real CLI, on synthetic stages (no ML toolchain)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import BASE_CONFIG, Cli


def _by_id(doc) -> dict:
    return {n["id"]: n for n in (doc["nodes"] if isinstance(doc, dict) else doc)}


def test_build_then_everything_cached(cli: Cli):
    cfg = cli.config()
    doc = cli.json("build", str(cfg))
    nodes = _by_id(doc)
    assert {n["status"] for n in nodes.values()} == {"ran"}
    assert nodes["final@rtx4090"]["metrics"] == {"bytes": len("seed=0\ntarget=rtx4090\n")}
    assert nodes["middle"]["peak_rss_mb"] > 0 and nodes["middle"]["seconds"] >= 0
    assert 0 < nodes["middle"]["peak_anon_mb"] <= nodes["middle"]["peak_rss_mb"]  # anonymous pages only
    run = Path(doc["run_dir"])
    assert (run / "report.md").read_text().count("| ran |") == 5
    assert json.loads((run / "report.json").read_text())["result"] == "ok"
    # published view of the outputs
    out = cli.tmp / "artifacts" / "out" / "fake" / "final@rtx4090" / "final.bin"
    assert out.read_text().endswith("target=rtx4090\n")
    # lock file: node -> key and outputs
    import yaml

    lock = yaml.safe_load((cli.tmp / "artifacts" / "locks" / "fake.lock").read_text())
    assert lock["nodes"]["middle"]["key"] == nodes["middle"]["key"]
    assert set(lock["nodes"]["middle"]["outs"]) == {"part1.txt", "sub/part2.txt"}

    plan = cli.json("plan", str(cfg))
    assert all(n["cached"] for n in plan) and {"id", "stage", "target", "key", "cached"} <= set(plan[0])
    again = _by_id(cli.json("build", str(cfg)))
    assert {n["status"] for n in again.values()} == {"cached"}
    assert {k: n["key"] for k, n in again.items()} == {k: n["key"] for k, n in nodes.items()}


def test_changing_one_stage_params_reruns_it_and_dependants_only(cli: Cli):
    cfg = cli.config()
    cli("build", str(cfg))
    cli.config(BASE_CONFIG + "calibration: {samples: 3}\n")  # read by `middle` only
    plan = _by_id(cli.json("plan", str(cfg)))
    assert plan["source"]["cached"] and plan["other"]["cached"]
    assert not plan["middle"]["cached"] and "params" in plan["middle"]["reason"]
    assert plan["final@rtx4090"]["key"] is None and "upstream middle" in plan["final@rtx4090"]["reason"]
    doc = _by_id(cli.json("build", str(cfg)))
    assert {k for k, n in doc.items() if n["status"] == "ran"} == {"middle", "final@rtx3090", "final@rtx4090"}
    assert doc["source"]["status"] == doc["other"]["status"] == "cached"


def test_force_reruns_a_stage(cli: Cli):
    cfg = cli.config()
    cli("build", str(cfg))
    doc = _by_id(cli.json("build", str(cfg), "--force", "other"))
    assert doc["other"]["status"] == "ran" and doc["middle"]["status"] == "cached"


def test_target_and_until_selection(cli: Cli):
    cfg = cli.config()
    doc = _by_id(cli.json("build", str(cfg), "--until", "middle"))
    assert set(doc) == {"source", "middle"}
    doc = _by_id(cli.json("build", str(cfg), "--target", "rtx5090"))
    assert "final@rtx5090" in doc and "final@rtx4090" not in doc


def test_parallel_build(cli: Cli):
    cfg = cli.config()
    doc = _by_id(cli.json("build", str(cfg), "-j", "2"))
    assert {n["status"] for n in doc.values()} == {"ran"}


def test_failing_target_fails_only_its_node(cli: Cli):
    cfg = cli.config(BASE_CONFIG.replace("[rtx3090, rtx4090]", "[rtx4090, h100]"))
    r = cli("build", str(cfg), "--json", check=1)
    doc = _by_id(json.loads(r.stdout))
    assert doc["final@h100"]["status"] == "failed"
    assert "full TensorRT is not installed" in doc["final@h100"]["error"]
    assert doc["final@rtx4090"]["status"] == "ran"


def test_gate_miss_exits_1_and_reports_figures(cli: Cli):
    cfg = cli.config(BASE_CONFIG + "gates: {int8: {cosine: 0.5}}\n")
    r = cli("build", str(cfg), check=1)
    assert "parity gate missed: fake.cosine 0.501" in r.stderr and "Traceback" not in r.stderr
    report = (cli.tmp / "artifacts" / "runs" / "fake" / "latest" / "report.md").read_text()
    assert "| fake.cosine | 0.501 | >= 0.99 | **NO** |" in report
    assert not any("final" in n for n in os.listdir(cli.tmp / "artifacts" / "out" / "fake"))


def test_sigkill_mid_stage_leaves_nothing_trusted(cli: Cli):
    cfg = cli.config()
    env = {**cli.env, "FAKE_MIDDLE_SLEEP": "30"}
    p = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "build", str(cfg)], cwd=cli.tmp, env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    tmp_root = cli.tmp / "artifacts" / "cache" / ".tmp"
    deadline = time.time() + 60
    while time.time() < deadline:  # wait until `middle` has written part of its outputs
        if any(tmp_root.glob("*/out/part1.txt")):
            break
        time.sleep(0.1)
    else:
        raise AssertionError("middle never started")
    os.killpg(p.pid, signal.SIGKILL)  # the whole build: CLI and its workers
    p.wait()
    plan = _by_id(cli.json("plan", str(cfg)))
    assert plan["source"]["cached"] and not plan["middle"]["cached"]
    doc = _by_id(cli.json("build", str(cfg)))
    assert doc["middle"]["status"] == "ran" and doc["final@rtx4090"]["status"] == "ran"
    gc = cli.json("gc")
    assert gc["stale"] and not gc["removed"]


def test_two_builders_at_once(cli: Cli):
    cfg = cli.config()
    procs = [subprocess.Popen([sys.executable, "-m", "pipeline.cli", "build", str(cfg), "--json"], cwd=cli.tmp,
                              env=cli.env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
             for _ in range(2)]
    docs = [json.loads(p.communicate(timeout=300)[0]) for p in procs]
    assert all(d["result"] == "ok" for d in docs)
    for nid in ("source", "middle", "final@rtx4090"):
        assert len({d_["key"] for d in docs for d_ in d["nodes"] if d_["id"] == nid}) == 1
    after = _by_id(cli.json("build", str(cfg)))
    assert {n["status"] for n in after.values()} == {"cached"}


def test_corrupted_entry_is_rebuilt(cli: Cli):
    cfg = cli.config()
    doc = _by_id(cli.json("build", str(cfg)))
    key = doc["middle"]["key"]
    f = cli.tmp / "artifacts" / "cache" / key / "out" / "part1.txt"
    f.write_text("tampered")
    plan = _by_id(cli.json("plan", str(cfg)))
    assert not plan["middle"]["cached"] and "damaged" in plan["middle"]["reason"]
    doc = _by_id(cli.json("build", str(cfg)))
    assert doc["middle"]["status"] == "ran" and doc["middle"]["key"] == key
    assert (cli.tmp / "artifacts" / "cache" / key / "out" / "part1.txt").read_text() == "seed=0\n"


def test_show_and_report(cli: Cli):
    cfg = cli.config()
    doc = _by_id(cli.json("build", str(cfg)))
    key = doc["middle"]["key"]
    shown = json.loads(cli("show", key[:10]).stdout)
    assert shown["key"] == key and shown["material"]["stage"] == "middle"
    assert "## Nodes" in cli("report", "fake").stdout
    assert json.loads(cli("report", "fake", "--json").stdout)["result"] == "ok"
    assert cli("show", "zzzz", check=2).stderr.startswith("vlmforge: error: show: no cache entry")


def test_deliverables_are_named_by_key_and_read_only(cli: Cli):
    cfg = cli.config()
    doc = cli.json("build", str(cfg))
    key = _by_id(doc)["final@rtx4090"]["key"]
    pkg = cli.tmp / "artifacts" / "packages" / f"fake-rtx4090-{key[:16]}.bin"
    assert str(pkg) in doc["delivered"] and pkg.read_text().endswith("target=rtx4090\n")
    assert not pkg.stat().st_mode & 0o222
    assert len(doc["delivered"]) == 2  # one per target; nodes without deliverables hand out nothing


def test_evicted_entry_keeps_dependants_cached_and_is_rebuilt_only_when_read(cli: Cli):
    """`vlmforge evict`: the outputs go, the manifest stays. What was built from it stays cached
    (its digests still key them); a node that runs and reads it rebuilds it, once."""
    cfg = cli.config()
    first = _by_id(cli.json("build", str(cfg)))
    entry = cli.tmp / "artifacts" / "cache" / first["middle"]["key"]
    res = cli.json("evict", first["middle"]["key"][:10])
    assert res["evicted"] == [first["middle"]["key"]] and res["freed_bytes"] > 0
    assert not (entry / "out").exists() and (entry / "manifest.json").is_file()
    assert cli("evict", first["middle"]["key"], check=1).stdout.count("already evicted") == 1
    plan = _by_id(cli.json("plan", str(cfg)))
    assert not plan["middle"]["cached"] and "evicted" in plan["middle"]["reason"]
    assert plan["final@rtx4090"]["cached"] and plan["final@rtx4090"]["key"] == first["final@rtx4090"]["key"]

    again = _by_id(cli.json("build", str(cfg)))
    assert again["middle"]["status"] == "evicted" and again["middle"]["evicted"]
    assert {n["status"] for k, n in again.items() if k != "middle"} == {"cached"}
    assert not (cli.tmp / "artifacts" / "out" / "fake" / "middle").exists()  # no view of nothing
    assert (cli.tmp / "artifacts" / "out" / "fake" / "final@rtx4090" / "final.bin").is_file()
    assert cli.json("fsck")["damaged"] == {}  # evicted is not damaged
    assert json.loads(cli("show", first["middle"]["key"]).stdout)["key"] == first["middle"]["key"]

    cli.config(BASE_CONFIG + "engine: {workspace_mb: 512}\n")  # read by `final` only: it runs, reads middle
    rebuilt = _by_id(cli.json("build", str(cfg), "--target", "rtx3090"))
    assert rebuilt["middle"]["status"] == "ran" and rebuilt["middle"]["key"] == first["middle"]["key"]
    assert rebuilt["final@rtx3090"]["status"] == "ran" and (entry / "out" / "part1.txt").is_file()
    assert not (entry / "evicted.json").exists()
    assert cli.json("fsck")["damaged"] == {}


def test_an_evicted_node_asked_for_itself_is_rebuilt(cli: Cli):
    cfg = cli.config()
    key = _by_id(cli.json("build", str(cfg)))["middle"]["key"]
    cli("evict", key)
    doc = _by_id(cli.json("build", str(cfg), "--until", "middle"))
    assert doc["middle"]["status"] == "ran" and doc["source"]["status"] == "cached"
    assert (cli.tmp / "artifacts" / "out" / "fake" / "middle" / "part1.txt").is_file()
    assert "no cache entry matches" in cli("evict", "ffff", check=2).stderr
