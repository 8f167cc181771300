"""The default config (the embedded tiny Qwen2.5-VL, three RTX targets) built on a real local Ray
cluster: a head that runs nothing and two workers with different custom resources, one shared
cache folder. Every real stage runs as a Ray task; the second build is fully cached."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import REPO, Cli

pytest.importorskip("ray")

from pipeline.farm_cluster import LocalCluster, WorkerSpec  # noqa: E402


@pytest.mark.slow
def test_default_config_on_a_two_worker_cluster(tmp_path: Path) -> None:
    from stages import STAGE_MODULES

    workers = [WorkerSpec(1, 6 << 30, {"sm_86": 1.0}), WorkerSpec(1, 6 << 30, {"pool_b": 1.0})]
    with LocalCluster(workers, log_dir=tmp_path) as cluster:
        cli = Cli(tmp_path, stages=",".join(STAGE_MODULES))
        cli.env.update({k: v for k, v in cluster.env.items() if k.startswith("RAY_")})
        args = ("build", str(REPO / "configs" / "default.yaml"), "--executor", "ray", "--address", cluster.address)
        doc = cli.json(*args)
        assert doc["result"] == "ok", [n["error"] for n in doc["nodes"] if n["error"]]
        nodes = doc["nodes"]
        assert {n["target"] for n in nodes} == {None, "rtx3090", "rtx4090", "rtx5090"}
        ran = [n for n in nodes if n["status"] == "ran"]
        # a target-independent node (quantize for two FP8 targets) runs once: the other is its cache hit
        ran_keys = {n["key"] for n in ran}
        assert all(n["status"] == "ran" or (n["status"] == "cached" and n["key"] in ran_keys) for n in nodes)
        ray_nodes = {n["worker"].rsplit(" ", 1)[-1] for n in ran}
        assert all(" on ray node " in n["worker"] for n in ran)
        assert len(ray_nodes) == 2, ray_nodes  # both workers ran nodes; the head (0 CPUs) none
        gates = [g for n in nodes for g in n["gates"]]
        assert gates and all(g["passed"] for g in gates)
        md = (Path(doc["run_dir"]) / "report.md").read_text()
        assert all(n["worker"] in md for n in ran)
        again = cli.json(*args)
        assert {n["status"] for n in again["nodes"]} == {"cached"}
        fsck = cli("fsck")
        assert " 0 damaged" in fsck.stdout
