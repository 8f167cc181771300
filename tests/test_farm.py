"""The Ray executor on a real local cluster: a head and two workers (separate raylets, each with
its own custom resource), one shared cache folder. The fake stages keep each build to seconds;
tests/test_farm_default.py builds the real default config on such a cluster."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import Cli

pytest.importorskip("ray")

from pipeline.farm_cluster import LocalCluster, WorkerSpec  # noqa: E402

CONFIG_B = """
name: fake2
model: {generate: tiny, family: qwen2_vl}
targets: [rtx4090, rtx5090]
"""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> LocalCluster:
    logs = tmp_path_factory.mktemp("ray-logs")
    with LocalCluster([WorkerSpec(1, 2 << 30, {"sm_86": 1.0}), WorkerSpec(1, 2 << 30, {"pool_b": 1.0})],
                      log_dir=logs) as c:
        yield c


def _farm_cli(tmp: Path, cluster: LocalCluster) -> Cli:
    cli = Cli(tmp)
    cli.env.update({k: v for k, v in cluster.env.items() if k.startswith("RAY_")})
    return cli


def _by_id(doc: dict) -> dict[str, dict]:
    return {n["id"]: n for n in doc["nodes"]}


def test_farm_build_names_each_worker_and_second_build_is_cached(tmp_path: Path, cluster: LocalCluster) -> None:
    cli = _farm_cli(tmp_path, cluster)
    cfg = cli.config()
    doc = cli.json("build", str(cfg), "--executor", "ray", "--address", cluster.address)
    assert doc["result"] == "ok" and doc["executor"].startswith("ray")
    nodes = _by_id(doc)
    assert {n["status"] for n in nodes.values()} == {"ran"}
    pids = set()
    for n in nodes.values():
        assert " on ray node " in n["worker"], n["worker"]
        pids.add(n["worker"].split(" ")[0])
    assert len(pids) == len(nodes)  # a fresh worker process per node, as the local pool has
    md = (Path(doc["run_dir"]) / "report.md").read_text()
    assert "| worker |" in md and nodes["middle"]["worker"] in md
    again = cli.json("build", str(cfg), "--executor", "ray", "--address", cluster.address)
    assert {n["status"] for n in again["nodes"]} == {"cached"}


def test_a_node_no_worker_can_run_fails_at_once_naming_what_it_needs(tmp_path: Path, cluster: LocalCluster) -> None:
    cli = _farm_cli(tmp_path, cluster)
    t0 = time.time()
    r = cli("build", str(cli.config()), "--target", "h100", "--executor", "ray", "--address", cluster.address, check=1)
    assert time.time() - t0 < 30
    line = [x for x in r.stderr.splitlines() if "FAILED" in x]
    assert len(line) == 1, r.stderr
    assert "final@h100 needs a worker with sm_90; the cluster offers: " in line[0]
    assert "sm_86" in line[0] and "pool_b" in line[0]
    doc = json.loads((tmp_path / "artifacts" / "runs" / "fake" / "latest" / "report.json").read_text())
    assert {n["id"]: n["status"] for n in doc["nodes"]} == {
        "source": "skipped", "middle": "skipped", "other": "skipped", "final@h100": "failed"}
    assert not list((tmp_path / "artifacts" / "cache").glob("[0-9a-f]*"))  # nothing ran


def test_a_worker_killed_mid_node_is_retried_and_the_report_says_so(tmp_path: Path, cluster: LocalCluster) -> None:
    cli = _farm_cli(tmp_path, cluster)
    marker = tmp_path / "first-try-started"
    env = {**cli.env, "VLMFORGE_FAKE_SLEEP_ONCE": str(marker)}
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "build", str(cli.config()), "--json", "--executor",
                             "ray", "--address", cluster.address], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    killed: list[int] = []

    def kill_first_try() -> None:
        end = time.time() + 120
        while time.time() < end and not marker.exists():
            time.sleep(0.1)
        tries = list((tmp_path / "artifacts" / "runs" / "fake").glob("*/attempts/middle.jsonl"))
        pid = json.loads(tries[0].read_text().splitlines()[0])["pid"]
        os.kill(pid, signal.SIGKILL)  # the worker process itself, mid-stage
        killed.append(pid)

    killer = threading.Thread(target=kill_first_try)
    killer.start()
    out, err = proc.communicate(timeout=300)
    killer.join()
    assert proc.returncode == 0, err
    middle = _by_id(json.loads(out))["middle"]
    assert middle["status"] == "ran"
    assert [a["pid"] for a in middle["attempts"]] == killed
    assert str(killed[0]) not in middle["worker"]
    assert middle["retried"].startswith("retried by the executor: try 1 on ")
    md = (Path(json.loads(out)["run_dir"]) / "report.md").read_text()
    assert "retried by the executor" in md
    fsck = subprocess.run([sys.executable, "-m", "pipeline.cli", "fsck", "--json"], cwd=tmp_path, env=cli.env,
                          capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr


def test_overlapping_farm_builds_at_once_leave_every_entry_whole(tmp_path: Path, cluster: LocalCluster) -> None:
    cli = _farm_cli(tmp_path, cluster)
    a, b = cli.config(), cli.config(CONFIG_B, "fake2.yaml")
    env = {**cli.env, "FAKE_MIDDLE_SLEEP": "2"}
    procs = [subprocess.Popen([sys.executable, "-m", "pipeline.cli", "build", str(c), "--json", "--executor", "ray",
                               "--address", cluster.address], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for c in (a, b)]
    docs = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        docs.append(_by_id(json.loads(out)))
    for shared in ("source", "middle", "other", "final@rtx4090"):
        assert docs[0][shared]["key"] == docs[1][shared]["key"]
    fsck = json.loads(cli("fsck", "--json").stdout)
    assert fsck["damaged"] == {} and fsck["checked"] == 6, fsck  # 4 shared + final@rtx3090 + final@rtx5090
    assert not list((tmp_path / "artifacts" / "cache" / ".tmp").glob("*"))


def test_node_runs_only_that_node_from_the_shared_cache(tmp_path: Path, cluster: LocalCluster) -> None:
    cli = _farm_cli(tmp_path, cluster)
    cfg = str(cli.config())
    r = cli("build", cfg, "--node", "final@rtx3090", check=1)
    assert "FAILED source: input source is not in the cache" in r.stderr and "build source first" in r.stderr
    assert not list((tmp_path / "artifacts" / "cache").glob("[0-9a-f]*"))
    ray_args = ("--executor", "ray", "--address", cluster.address)
    first = _by_id(cli.json("build", cfg, "--node", "source", "--node", "middle", *ray_args))
    assert {k: v["status"] for k, v in first.items()} == {"source": "ran", "middle": "ran"}
    only = _by_id(cli.json("build", cfg, "--node", "final@rtx3090", *ray_args))
    assert {k: v["status"] for k, v in only.items()} == {"source": "cached", "middle": "cached", "final@rtx3090": "ran"}
    r = cli("build", cfg, "--node", "final@a100", check=2)
    assert "--node: no node 'final@a100' in this build" in r.stderr


def test_plan_json_gives_each_nodes_resource_needs(tmp_path: Path, tiny: Path) -> None:
    from stages import STAGE_MODULES
    from stages.lib.sizing import FLOOR_BYTES, RATIOS

    cli = Cli(tmp_path, stages=",".join(STAGE_MODULES))
    cfg = cli.config(f"name: mine\nmodel: {{checkpoint: {tiny}}}\ntargets: [rtx4090, h100]\n", "mine.yaml")
    rows = {r["id"]: r for r in cli.json("plan", str(cfg))}
    weights = sum(p.stat().st_size for p in tiny.glob("*.safetensors"))
    assert weights > 0
    for nid, stage in (("export_decoder", "export_decoder"), ("reference", "reference"), ("engine@rtx4090", "engine")):
        assert rows[nid]["resources"]["memory_bytes"] == FLOOR_BYTES + int(RATIOS[stage] * weights)
    assert rows["engine@h100"]["resources"]["custom"] == {"sm_90": 1.0}
    assert rows["verify@h100"]["resources"]["custom"] == {"sm_90": 1.0}
    assert rows["engine@rtx4090"]["resources"]["custom"] == {}  # TensorRT-RTX compiles on any CPU worker
    assert rows["engine@h100"]["deps"] == ["quantize@h100"]


def test_make_farm_helper_runs_a_command_on_a_fresh_cluster(tmp_path: Path) -> None:
    env = {**Cli(tmp_path).env}
    (tmp_path / "fake.yaml").write_text("name: fake\nmodel: {generate: tiny, family: qwen2_vl}\ntargets: [rtx3090]\n")
    r = subprocess.run([sys.executable, "-m", "pipeline.farm_cluster", "--workers", "2", "--", "build", "fake.yaml"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "head + 2 workers" in r.stderr and "ok: 4 ran" in r.stderr


def test_a_farm_driver_reads_progress_from_node_logs_whole_lines_only(tmp_path: Path) -> None:
    from pipeline.farm import read_progress

    log = tmp_path / "middle.log"
    assert read_progress(log, 0) == ([], 0)  # not started yet
    log.write_text("some library warning\n[progress] writing half\n[progress] hashing")
    msgs, off = read_progress(log, 0)
    assert msgs == ["writing half"] and off == len("some library warning\n[progress] writing half\n")
    with open(log, "a") as f:
        f.write(" outputs\n")
    assert read_progress(log, off) == (["hashing outputs"], log.stat().st_size)
