"""A Ray cluster of processes on this machine, for ``make farm`` and the farm tests.

A head that runs no node (``--num-cpus 0``: on a real farm it is the scheduler's host) and
workers, each a separate ``ray start --block`` process with its own CPUs, memory and custom
resources, as separate hosts would be. ``--block`` keeps each node's processes tied to the one
process started here, so stopping it stops exactly that node and never another Ray on the host
(``ray stop`` would stop every Ray of the user).

    python -m pipeline.farm_cluster [--workers 2] -- build configs/default.yaml [vlmforge args]
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class WorkerSpec:
    cpus: int = 1
    memory_bytes: int = 4 << 30
    resources: dict[str, float] = field(default_factory=dict)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LocalCluster:
    def __init__(self, workers: list[WorkerSpec], log_dir: Path | None = None):
        self.workers = workers
        # Ray's socket paths must stay short (AF_UNIX: 107 bytes): a short temp dir of our own
        self.temp_dir = Path(tempfile.mkdtemp(prefix="vfray-", dir="/tmp"))
        self.log_dir = log_dir or self.temp_dir
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.procs: list[subprocess.Popen[bytes]] = []
        # token authentication with a token of this cluster's own: every node and every client
        # started with ``self.env`` has it, and nothing else on the host can submit work to it
        self.env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p),
                    "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}

    def _start(self, args: list[str], name: str) -> subprocess.Popen[bytes]:
        ray = Path(sys.executable).parent / "ray"
        log = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 - the process owns it until it ends
        proc = subprocess.Popen([str(ray), "start", "--block", "--disable-usage-stats",
                                 "--object-store-memory", str(100 << 20), *args],
                                stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        self.procs.append(proc)
        return proc

    def start(self, timeout: float = 90.0) -> str:
        self._start(["--head", "--port", str(self.port), "--num-cpus", "0", "--temp-dir", str(self.temp_dir),
                     "--include-dashboard", "false"], "head")
        self._wait(1, timeout)
        for i, w in enumerate(self.workers):  # one at a time: raylets starting together on one host time out
            self._start(["--address", self.address, "--num-cpus", str(w.cpus), "--memory", str(w.memory_bytes),
                         "--resources", json.dumps(w.resources)], f"worker{i}")
            self._wait(2 + i, timeout)
        return self.address

    def _wait(self, nodes: int, timeout: float) -> None:
        """Until ``nodes`` nodes are alive: a build that looked earlier would see a smaller cluster."""
        probe = ("import ray,sys; ray.init(address=sys.argv[1], logging_level='ERROR', configure_logging=False); "
                 "print(sum(n['Alive'] for n in ray.nodes()))")
        end = time.time() + timeout
        while time.time() < end:
            dead = [p for p in self.procs if p.poll() is not None]
            if dead:
                raise RuntimeError(f"a Ray node exited with {dead[0].returncode}; logs in {self.log_dir}")
            r = subprocess.run([sys.executable, "-c", probe, self.address], capture_output=True, text=True, env=self.env,
                               timeout=60)
            if r.returncode == 0 and r.stdout.strip().splitlines()[-1:] == [str(nodes)]:
                return
            time.sleep(0.5)
        raise RuntimeError(f"the local Ray cluster did not reach {nodes} nodes in {timeout:.0f} s; logs in {self.log_dir}")

    def stop(self) -> None:
        for proc in reversed(self.procs):  # workers before the head
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in reversed(self.procs):
            try:
                proc.wait(45)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self.procs.clear()
        import shutil

        shutil.rmtree(self.temp_dir, ignore_errors=True)  # Ray's session files (logs live in log_dir)

    def __enter__(self) -> LocalCluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def _default_workers(n: int) -> list[WorkerSpec]:
    """Split this machine between ``n`` workers (CPUs, 80 % of the memory available now)."""
    avail = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    cpus = max(1, (os.cpu_count() or 1) // n)
    return [WorkerSpec(cpus=cpus, memory_bytes=int(0.8 * avail / n), resources={f"worker{i}": 1.0}) for i in range(n)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.farm_cluster",
                                description="start a local Ray cluster, run one vlmforge command on it, stop it")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- build CONFIG [args]: run on the cluster")
    args = p.parse_args(argv)
    cmd = [c for c in args.command if c != "--"] or ["build", "configs/default.yaml"]
    with LocalCluster(_default_workers(args.workers)) as cluster:
        print(f"local Ray cluster at {cluster.address}: head + {args.workers} workers", file=sys.stderr)
        extra = ["--executor", "ray", "--address", cluster.address] if cmd[0] == "build" else []
        return subprocess.call([sys.executable, "-m", "pipeline.cli", *cmd, *extra], env=cluster.env)


if __name__ == "__main__":
    sys.exit(main())
