"""The executor's own cost per node: the local process pool vs Ray, side by side in one run.

    .venv/bin/python bench/farm_overhead.py [--repeats 3]

A graph of the fake stages (tests/fake_stages: each writes a few bytes, so what is measured is
the executor) over six RTX targets: 9 nodes. Each executor runs it forced (every node runs) and
fully cached; the per-node overhead is (forced wall - cached wall) / 9, which takes the CLI's
start and Ray's connect out of it. Ray runs on a local cluster (a head and two 1-CPU workers,
separate raylets, as ``make farm`` starts), at 1 and at 2 nodes at once; the local pool at -j 1
and -j 2. The median of ``--repeats`` runs is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
FAKE = "tests.fake_stages.source,tests.fake_stages.middle,tests.fake_stages.other,tests.fake_stages.final"
CONFIG = """name: overhead
model: {generate: tiny, family: qwen2_vl}
targets: [rtx2080ti, rtx3090, rtx4090, rtx4060, rtx5090, dgx-spark]
"""
FORCE = [a for s in ("source", "middle", "other", "final") for a in ("--force", s)]


def _wall(env: dict[str, str], cfg: Path, args: list[str]) -> tuple[float, int]:
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "pipeline.cli", "build", str(cfg), "--json", *args], env=env,
                       capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"build failed ({' '.join(args)}):\n{r.stderr[-2000:]}")
    return wall, sum(n["status"] == "ran" for n in json.loads(r.stdout)["nodes"])


def main() -> int:
    from pipeline.farm_cluster import LocalCluster, WorkerSpec

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="farm-overhead-"))
    cfg = work / "overhead.yaml"
    cfg.write_text(CONFIG)
    with LocalCluster([WorkerSpec(1, 2 << 30, {"w0": 1.0}), WorkerSpec(1, 2 << 30, {"w1": 1.0})], log_dir=work) as c:
        env = {**c.env, "VLMFORGE_ARTIFACTS": str(work / "artifacts"), "VLMFORGE_STAGE_MODULES": FAKE}
        ray = ["--executor", "ray", "--address", c.address]
        runs = {"local -j 1": ["-j", "1"], "local -j 2": ["-j", "2"], "ray -j 1": [*ray, "-j", "1"], "ray (2 workers)": ray}
        rows = []
        for name, args in runs.items():
            per_node, forced, cached = [], [], []
            for _ in range(a.repeats):
                f, ran = _wall(env, cfg, [*args, *FORCE])
                k, _ = _wall(env, cfg, args)
                forced.append(f)
                cached.append(k)
                per_node.append((f - k) / ran)
            rows.append((name, statistics.median(forced), statistics.median(cached), statistics.median(per_node), ran))
    base = {r[0]: r[3] for r in rows}
    print(f"{'executor':18} {'forced s':>9} {'cached s':>9} {'per node s':>11} {'nodes':>6} {'vs local, same -j':>18}")
    for name, f, k, p, n in rows:
        ref = base["local -j 1"] if name.endswith("-j 1") else base["local -j 2"]
        print(f"{name:18} {f:9.2f} {k:9.2f} {p:11.3f} {n:6d} {p / ref:17.2f}x")
    print(f"(median of {a.repeats}; cluster start and stop are not counted; {os.cpu_count()} CPUs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
