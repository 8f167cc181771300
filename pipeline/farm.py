"""The Ray executor: each node one Ray task, placed by the resources its stage declares.

Ray (not a scheduler of our own) places the tasks, reserves CPUs, memory and the hardware a
worker advertises (``ray start --resources '{"sm_90": 1}'``), and retries a task whose worker
process died. What stays ours is what Ray cannot know:

- a node no worker can ever run fails before anything starts, in one line, instead of queueing
  forever (Ray would wait for a worker that may never join);
- each task runs in a fresh worker process (``max_calls=1``), as the local pool runs each node
  in its own process: its peak memory is its own and a crash takes only that node;
- every try writes one line to ``<run>/attempts/<node>.jsonl`` before it starts, so the try that
  finishes reports the earlier ones whose worker died, and the report says who retried what.

The cache is shared by every worker (``VLMFORGE_ARTIFACTS`` on a shared filesystem, at the same
path on every host); its commit protocol needs no lock to stay correct (``pipeline.cache``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from pipeline.resources import Worker, unplaceable
from pipeline.worker import PROGRESS_MARK, NodeOutcome, NodeSpec

RETRIES = 2  # a node whose worker dies is tried again this many times, elsewhere if Ray can
FORWARDED_ENV = ("PYTHONPATH", "VLMFORGE_")  # what a worker must see as the driver does


def _attempts_file(spec: NodeSpec) -> Path:
    return Path(spec.log).parent.parent / "attempts" / f"{Path(spec.log).stem}.jsonl"


def _record_attempt(path: Path, who: str) -> list[dict[str, Any]]:
    """Append this try; return the earlier ones (a try that got this far has not died yet)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    earlier = []
    if path.is_file():
        earlier = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    line = json.dumps({"worker": who, "pid": os.getpid(), "started": round(time.time(), 3)}) + "\n"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, line.encode())  # one short O_APPEND write: tries never interleave
    finally:
        os.close(fd)
    return earlier


def run_task(spec: NodeSpec) -> NodeOutcome:
    """The Ray task body, in a worker process of its own."""
    import ray

    from pipeline.worker import redirect_output, run_logged, whoami

    who = f"{whoami()} on ray node {ray.get_runtime_context().get_node_id()[:8]}"
    earlier = _record_attempt(_attempts_file(spec), who)
    redirect_output(Path(spec.log))
    outcome = run_logged(spec, lambda msg, frac=None: print(f"{PROGRESS_MARK}{msg}", flush=True), worker=who)
    return dataclasses.replace(outcome, attempts=tuple(earlier))


def read_progress(log: Path, offset: int) -> tuple[list[str], int]:
    """Progress lines a task has written to its node log since ``offset``, and the new offset: a
    Ray task has no pipe back to the driver, but its log is on the shared artifacts folder.
    Only whole lines count (a line being written is read next time)."""
    try:
        with open(log, "rb") as f:
            f.seek(offset)
            chunk = f.read()
    except OSError:
        return [], offset
    end = chunk.rfind(b"\n") + 1
    lines = chunk[:end].decode("utf-8", "replace").splitlines()
    return [x[len(PROGRESS_MARK):] for x in lines if x.startswith(PROGRESS_MARK)], offset + end


def _driver_env() -> dict[str, str]:
    repo = str(Path(__file__).resolve().parent.parent)  # workers import this same code
    env = {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV)}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (repo, env.get("PYTHONPATH", "")) if p)
    return env


class RayPool:
    """The runner's executor interface (``start``, ``poll``, ``stop``, ``running``,
    ``unplaceable``) over Ray tasks. ``address``: a cluster to join (``ray start --head`` printed
    it); None joins ``RAY_ADDRESS`` or starts Ray on this machine alone."""

    def __init__(self, address: str | None = None):
        import ray

        self._ray = ray
        self._owned = not ray.is_initialized()
        if self._owned:
            ray.init(address=address or os.environ.get("RAY_ADDRESS"), logging_level=logging.ERROR, log_to_driver=False,
                     runtime_env={"env_vars": _driver_env()}, configure_logging=False)
        self._remote = ray.remote(max_calls=1, max_retries=RETRIES, retry_exceptions=False)(run_task)
        self.running: dict[Any, tuple[Any, NodeSpec]] = {}
        self._log_offsets: dict[str, int] = {}

    def workers(self) -> list[Worker]:
        return [Worker(f"{n['NodeManagerAddress']}/{n['NodeID'][:8]}", dict(n["Resources"]))
                for n in self._ray.nodes() if n.get("Alive")]

    def unplaceable(self, states: list[Any]) -> dict[str, str]:
        workers = self.workers()
        out = {}
        for s in states:
            why = unplaceable(s.node.id, s.resources, workers)
            if why:
                out[s.node.id] = why
        return out

    def start(self, state: Any, spec: NodeSpec) -> None:
        need = state.resources
        opts: dict[str, Any] = {"num_cpus": need.cpus, "resources": dict(need.custom), "name": spec.node_id}
        if need.memory_bytes:
            opts["memory"] = need.memory_bytes
        self.running[self._remote.options(**opts).remote(spec)] = (state, spec)

    def poll(self, timeout: float, on_progress: Any) -> list[tuple[Any, NodeOutcome]]:
        refs = list(self.running)
        ready, _ = self._ray.wait(refs, num_returns=len(refs), timeout=timeout)
        for _, spec in self.running.values():  # what the running nodes have said so far
            msgs, self._log_offsets[spec.node_id] = read_progress(Path(spec.log), self._log_offsets.get(spec.node_id, 0))
            for msg in msgs[-1:]:
                on_progress(spec.node_id, msg, None)
        done = []
        for ref in ready:
            state, spec = self.running.pop(ref)
            try:
                outcome = self._ray.get(ref)
            except self._ray.exceptions.RayError as e:  # every try's worker died (or Ray itself failed)
                tries = _attempts_file(spec)
                earlier = [json.loads(x) for x in tries.read_text().splitlines()] if tries.is_file() else []
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                outcome = NodeOutcome("failed", attempts=tuple(earlier),
                                      error=f"{len(earlier) or 1} tries, every worker died ({type(e).__name__}: {first})")
            done.append((state, outcome))
        return done

    def stop(self) -> None:
        for ref in list(self.running):
            try:
                self._ray.cancel(ref, force=True)
            except Exception:  # noqa: BLE001 - already finished or gone: nothing to stop
                pass
        self.running.clear()
        if self._owned:
            self._ray.shutdown()
