"""Plan and build: key every node, reuse cached entries, run the rest (in parallel with -j)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.cache import CacheStore
from pipeline.config import BuildConfig
from pipeline.graph import Node
from pipeline.keys import cache_key, key_material, node_params
from pipeline.resources import DEFAULT, NodeResources
from pipeline.worker import NodeOutcome, NodeSpec
from pipeline.workers import Executor


@dataclass
class NodeState:
    node: Node
    key: str | None = None
    material: dict[str, Any] | None = None
    cached: bool = False
    reason: str = ""
    status: str = "pending"  # pending | cached | ran | failed | skipped | evicted (not needed)
    manifest: dict[str, Any] | None = None
    error: str = ""
    seconds: float = 0.0
    peak_rss_mb: float | None = None
    failed_result: dict[str, Any] = field(default_factory=dict)
    needs_host: str | None = None
    evicted: bool = False  # its entry's outputs were removed; the manifest still keys dependants
    resources: NodeResources = DEFAULT
    worker: str = ""  # which machine/process ran it (host:pid, or the Ray node)
    attempts: tuple[dict[str, Any], ...] = ()  # earlier tries whose worker died (the executor retried)

    def retried(self) -> str:
        """The report's line on the tries whose worker died (empty when the first try ended it)."""
        if not self.attempts:
            return ""
        died = "; ".join(f"try {i} on {a.get('worker', '?')} died" for i, a in enumerate(self.attempts, 1))
        return f"retried by the executor: {died}; try {len(self.attempts) + 1} on {self.worker or '?'} ended it"

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
            "report": m.get("report", self.failed_result.get("report", [])),
            "sections": [list(x) for x in n.stage.report_sections],
            "error": self.error,
            "needs_host": self.needs_host,
            "resources": self.resources.as_dict(),
            "worker": self.worker,
            "attempts": [dict(a) for a in self.attempts],
            "retried": self.retried(),
            "evicted": self.evicted and self.status == "evicted",
            # for a cached node: what building it cost when it ran
            "built_seconds": (m.get("timings") or {}).get("seconds"),
            "built_peak_rss_mb": (m.get("timings") or {}).get("peak_rss_mb"),
            # anonymous memory only (VmHWM also counts a mapped or page-cached weight file)
            "peak_anon_mb": (m.get("timings") or {}).get("peak_anon_mb"),
        }


class Planner:
    """Computes keys in topological order; a node's key needs its deps' output digests."""

    def __init__(self, cfg: BuildConfig, nodes: list[Node], store: CacheStore, force: frozenset[str] = frozenset()):
        self.cfg, self.nodes, self.store, self.force = cfg, nodes, store, set(force)
        self.states = {n.id: NodeState(n) for n in nodes}
        for n in nodes:
            if n.stage.resources is not None:
                self.states[n.id].resources = n.stage.resources(cfg, n.target)

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
        with self.store.gc_lock(exclusive=False):  # a concurrent gc cannot take what we found
            self.store.pin(s.key)
            if node.stage.name in self.force:
                s.cached, s.reason = False, "forced (--force)"
                return s
            found = self.store.lookup(s.key)
        s.cached, s.evicted = found.hit, found.evicted
        s.manifest = found.manifest  # an evicted entry's too: its digests key the dependants
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


def unneeded_evicted(planner: Planner) -> set[str]:
    """Evicted nodes no node that runs reads: they stay evicted. A node runs when it is not
    cached and is not evicted, or is evicted and is asked for itself (no dependant in the
    build) or read by a node that runs."""
    dependants: dict[str, list[str]] = {n.id: [] for n in planner.nodes}
    for n in planner.nodes:
        for d in n.deps:
            dependants.setdefault(d, []).append(n.id)
    runs: set[str] = set()
    for n in reversed(planner.nodes):  # topological order, so dependants are decided first
        s = planner.states[n.id]
        if not s.cached and (not s.evicted or not dependants[n.id] or any(d in runs for d in dependants[n.id])):
            runs.add(n.id)
    return {n.id for n in planner.nodes if planner.states[n.id].evicted and n.id not in runs}


def build(
    planner: Planner,
    jobs: int | None,
    run_dir: Path,
    on_event: Callable[[NodeState], None] = lambda s: None,
    on_progress: ProgressFn = lambda nid, msg, frac: None,
    pool: Executor | None = None,
    only: frozenset[str] | None = None,
) -> list[NodeState]:
    """Run every node that is not cached, each in its own process (``pool``: the local process
    pool by default, or ``pipeline.farm.RayPool``); a failed or killed node skips its dependants
    only, and every other node still completes. ``only``: run just these nodes; every other node
    is an input that must already be in the cache. ``jobs``: nodes at once (None: no limit, the
    executor's resources decide)."""
    import multiprocessing as mp

    from pipeline.workers import WorkerPool

    states = planner.states
    todo = list(planner.nodes)
    planner.plan()  # every key now: whether an evicted entry is read depends on its dependants
    stay_evicted = unneeded_evicted(planner)
    pool = pool if pool is not None else WorkerPool(mp.get_context("spawn"))
    to_run = [states[n.id] for n in todo if not states[n.id].cached and n.id not in stay_evicted]
    try:
        blocked = dict(pool.unplaceable(to_run))
        if only is not None:
            blocked.update(_missing_inputs(to_run, only))
        if blocked:  # fail now, in seconds: nothing would ever run them
            return _refuse(planner, blocked, on_event)
        while todo or pool.running:
            progressed = False
            for n in list(todo):
                s = states[n.id]
                if any(states[d].status in ("failed", "skipped") for d in n.deps):
                    s.status, s.reason = "skipped", "an upstream node failed"
                    todo.remove(n)
                    on_event(s)
                    progressed = True
                    continue
                if n.id in stay_evicted:
                    s.status = "evicted"
                    todo.remove(n)
                    on_event(s)
                    progressed = True
                    continue
                if not all(states[d].status in ("cached", "ran", "evicted") for d in n.deps):
                    continue
                if jobs is not None and len(pool.running) >= jobs:
                    break
                planner.refresh(n)
                todo.remove(n)
                progressed = True
                if s.cached:
                    s.status = "cached"
                    on_event(s)
                    continue
                s.status = "running"
                on_event(s)
                pool.start(s, _spec(planner, n, s, run_dir))
            if pool.running:
                for s, outcome in pool.poll(0.2, on_progress):
                    _finish(s, outcome)
                    on_event(s)
            elif not progressed and todo:
                raise RuntimeError(f"scheduler stalled on {[n.id for n in todo]}")  # graph bug
    finally:
        pool.stop()
        planner.store.memo.save()
    return [states[n.id] for n in planner.nodes]


def _missing_inputs(to_run: list[NodeState], only: frozenset[str]) -> dict[str, str]:
    """``--node``: an input that would have to be built is an error, named where it is keyed (its
    own inputs are there: the first missing one on each path); the rest are skipped."""
    asked = ", ".join(sorted(only))
    return {s.node.id: f"input {s.node.id} is not in the cache ({s.reason or 'not built'}); --node runs only "
                       f"{asked}: build {s.node.id} first" for s in to_run if s.node.id not in only and s.key is not None}


def _refuse(planner: Planner, blocked: dict[str, str], on_event: Callable[[NodeState], None]) -> list[NodeState]:
    first = next(iter(blocked))
    for n in planner.nodes:
        s = planner.states[n.id]
        if n.id in blocked:
            s.status, s.error = "failed", blocked[n.id]
        elif s.cached:
            s.status = "cached"
        else:
            s.status, s.reason = "skipped", f"not started: {first} cannot run ({len(blocked)} node(s) cannot)"
        on_event(s)
    return [planner.states[n.id] for n in planner.nodes]


def _spec(planner: Planner, n: Node, s: NodeState, run_dir: Path) -> NodeSpec:
    assert s.key is not None and s.material is not None
    dep_keys = {d: planner.states[d].key or "" for d in n.deps}
    return NodeSpec(
        key=s.key,
        node_id=n.id,
        module=n.module,
        params=node_params(n, planner.cfg),
        inputs={d.split("@")[0]: str(planner.store.out_dir(k)) for d, k in dep_keys.items()},
        input_keys=tuple(sorted(dep_keys.values())),
        external=dict(s.material["external"]),
        target=n.target.model_dump() if n.target else None,
        cache_root=str(planner.store.root),
        material=s.material,
        log=str(run_dir / "logs" / f"{n.id.replace('@', '_at_')}.log"),
        force=n.stage.name in planner.force,
    )


def _finish(s: NodeState, res: NodeOutcome) -> None:
    s.seconds = res.seconds
    s.peak_rss_mb = res.peak_rss_mb
    s.worker, s.attempts = res.worker, res.attempts
    if res.attempts:  # the report's note column says who retried what
        s.reason = "; ".join(x for x in (s.reason, s.retried()) if x)
    if res.status in ("ran", "cached") and res.manifest is not None:
        s.manifest, s.evicted = res.manifest, False
        s.status = res.status
        s.cached = res.status == "cached"
        if res.by_other:
            s.reason = "built by a concurrent builder"
        t = s.manifest.get("timings", {})
        if s.status == "ran":
            s.seconds, s.peak_rss_mb = t.get("seconds", s.seconds), t.get("peak_rss_mb", s.peak_rss_mb)
    else:
        s.status, s.error = "failed", res.error or "failed"
        s.failed_result = {"metrics": res.metrics, "gates": res.gates, "notes": res.notes, "report": res.report}
