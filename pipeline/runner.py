"""Plan and build: key every node, reuse cached entries, run the rest (in parallel with -j)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.cache import CacheStore
from pipeline.config import BuildConfig
from pipeline.graph import Node
from pipeline.keys import cache_key, external_files, key_material, node_params


@dataclass
class NodeState:
    node: Node
    key: str | None = None
    material: dict[str, Any] | None = None
    cached: bool = False
    reason: str = ""
    status: str = "pending"  # pending | cached | ran | failed | skipped
    manifest: dict[str, Any] | None = None
    error: str = ""
    seconds: float = 0.0
    peak_rss_mb: float | None = None
    failed_result: dict[str, Any] = field(default_factory=dict)
    needs_host: str | None = None

    def as_dict(self) -> dict[str, Any]:
        n = self.node
        m = self.manifest or {}
        return {
            "id": n.id,
            "stage": n.stage.name,
            "target": n.target.name if n.target else None,
            "key": self.key,
            "cached": self.cached,
            "status": self.status,
            "reason": self.reason,
            "seconds": round(self.seconds, 3),
            "peak_rss_mb": self.peak_rss_mb,
            "outputs": m.get("outputs", {}),
            "metrics": m.get("metrics", self.failed_result.get("metrics", {})),
            "gates": m.get("gates", self.failed_result.get("gates", [])),
            "notes": m.get("notes", self.failed_result.get("notes", [])),
            "error": self.error,
            "needs_host": self.needs_host,
            # for a cached node: what building it cost when it ran
            "built_seconds": (m.get("timings") or {}).get("seconds"),
            "built_peak_rss_mb": (m.get("timings") or {}).get("peak_rss_mb"),
        }


class Planner:
    """Computes keys in topological order; a node's key needs its deps' output digests."""

    def __init__(self, cfg: BuildConfig, nodes: list[Node], store: CacheStore, force: frozenset[str] = frozenset()):
        self.cfg, self.nodes, self.store, self.force = cfg, nodes, store, set(force)
        self.states = {n.id: NodeState(n) for n in nodes}

    def dep_outputs(self, node: Node) -> dict[str, dict[str, Any]] | None:
        out = {}
        for d in node.deps:
            st = self.states.get(d)
            if st is None or st.manifest is None:
                return None
            out[d] = st.manifest["outputs"]
        return out

    def refresh(self, node: Node) -> NodeState:
        """(Re)compute a node's key and cache status from what its deps have now."""
        s = self.states[node.id]
        if node.stage.needs_host:
            s.needs_host = node.stage.needs_host(self.cfg, node.target)
        deps = self.dep_outputs(node)
        if deps is None:
            pending = [d for d in node.deps if self.states.get(d) is None or self.states[d].manifest is None]
            s.key, s.cached = None, False
            s.reason = f"upstream {', '.join(pending)} will run first"
            return s
        s.material = key_material(node, self.cfg, deps, self.store.memo)
        s.key = cache_key(s.material)
        if node.stage.name in self.force:
            s.cached, s.reason = False, "forced (--force)"
            return s
        found = self.store.lookup(s.key)
        s.cached = found.hit
        s.manifest = found.manifest
        s.reason = "" if found.hit else self._why_not(node, found.reason)
        return s

    def _why_not(self, node: Node, reason: str) -> str:
        return reason if reason != "not built" else "no cache entry for this key (params, inputs or tools changed)"

    def plan(self) -> list[NodeState]:
        for n in self.nodes:
            self.refresh(n)
        self.store.memo.save()
        return [self.states[n.id] for n in self.nodes]


ProgressFn = Callable[[str, str, float | None], None]


def build(
    planner: Planner,
    jobs: int,
    run_dir: Path,
    on_event: Callable[[NodeState], None] = lambda s: None,
    on_progress: ProgressFn = lambda nid, msg, frac: None,
) -> list[NodeState]:
    """Run every node that is not cached; failures skip their dependants only."""
    import multiprocessing as mp
    import queue as queue_mod
    from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait

    from pipeline import worker

    states = planner.states
    todo = [n for n in planner.nodes]
    running: dict[Future[dict[str, Any]], NodeState] = {}
    ctx = mp.get_context("spawn")
    manager = None
    pool = None
    q: Any = None
    try:
        while todo or running:
            progressed = False
            for n in list(todo):
                s = states[n.id]
                if any(states[d].status in ("failed", "skipped") for d in n.deps):
                    s.status, s.reason = "skipped", "an upstream node failed"
                    todo.remove(n)
                    on_event(s)
                    progressed = True
                    continue
                if not all(states[d].status in ("cached", "ran") for d in n.deps):
                    continue
                if len(running) >= jobs:
                    break
                planner.refresh(n)
                todo.remove(n)
                progressed = True
                if s.cached:
                    s.status = "cached"
                    on_event(s)
                    continue
                if pool is None:  # start workers lazily: a fully cached build spawns nothing
                    manager = ctx.Manager()
                    q = manager.Queue()
                    pool = ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, max_tasks_per_child=1)
                spec = _spec(planner, n, s, run_dir, q)
                s.status = "running"
                on_event(s)
                running[pool.submit(worker.execute, spec)] = s
            if running:
                done, _ = wait(list(running), timeout=0.2, return_when=FIRST_COMPLETED)
                for fut in done:
                    s = running.pop(fut)
                    _finish(s, fut)
                    on_event(s)
            elif not progressed and todo:
                raise RuntimeError(f"scheduler stalled on {[n.id for n in todo]}")  # graph bug
            while q is not None:
                try:
                    nid, msg, frac = q.get_nowait()
                except (queue_mod.Empty, EOFError, OSError):
                    break
                on_progress(nid, msg, frac)
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        if manager is not None:
            manager.shutdown()
        planner.store.memo.save()
    return [states[n.id] for n in planner.nodes]


def _spec(planner: Planner, n: Node, s: NodeState, run_dir: Path, q: Any) -> dict[str, Any]:
    assert s.key is not None
    return {
        "key": s.key,
        "node_id": n.id,
        "module": n.module,
        "params": node_params(n, planner.cfg),
        "inputs": {d.split("@")[0]: str(planner.store.out_dir(planner.states[d].key or "")) for d in n.deps},
        "external": [str(p) for p in external_files(n, planner.cfg)],
        "target": n.target.model_dump() if n.target else None,
        "cache_root": str(planner.store.root),
        "material": s.material,
        "log": str(run_dir / "logs" / f"{n.id.replace('@', '_at_')}.log"),
        "queue": q,
        "force": n.stage.name in planner.force,
    }


def _finish(s: NodeState, fut: Any) -> None:
    t0 = time.time()
    try:
        res = fut.result()
    except BaseException as e:  # the worker process died (OOM kill, segfault in a native lib)
        s.status, s.error = "failed", f"worker process died: {type(e).__name__}: {e}"
        return
    s.seconds = res.get("seconds", time.time() - t0)
    s.peak_rss_mb = res.get("peak_rss_mb")
    if res["status"] in ("ran", "cached"):
        s.manifest = res["manifest"]
        s.status = res["status"]
        s.cached = res["status"] == "cached"
        if res.get("by_other"):
            s.reason = "built by a concurrent builder"
        t = s.manifest.get("timings", {}) if s.manifest else {}
        if s.status == "ran":
            s.seconds, s.peak_rss_mb = t.get("seconds", s.seconds), t.get("peak_rss_mb", s.peak_rss_mb)
    else:
        s.status, s.error, s.failed_result = "failed", res.get("error", "failed"), res
