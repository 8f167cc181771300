"""Runs one node in its own spawned process: lock the key, run the stage, commit atomically.

A process per node gives each node its own peak-RSS figure, keeps torch out of the parent, and
isolates crashes: a node whose process is killed (OOM killer, segfault in a native library) fails
alone; the parent notices the dead process and the rest of the build goes on. The parent and the
worker talk over one pipe: progress messages, then exactly one ``NodeOutcome``.
"""

from __future__ import annotations

import importlib
import os
import resource
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PROGRESS_MARK = "[progress] "  # a progress line in a node's log (a farm's driver reads them there)


@dataclass(frozen=True)
class NodeSpec:
    """Everything a worker needs, fixed by the parent when it keyed the node."""

    key: str
    node_id: str
    module: str  # where the stage is imported from
    params: dict[str, Any]
    inputs: dict[str, str]  # dep stage name -> its committed out folder
    input_keys: tuple[str, ...]  # held for reading while the node runs
    external: dict[str, str]  # file outside the cache -> sha256 when the node was keyed
    target: dict[str, Any] | None
    cache_root: str
    material: dict[str, Any]
    log: str
    force: bool = False


@dataclass(frozen=True)
class NodeOutcome:
    status: str  # ran | cached | failed
    manifest: dict[str, Any] | None = None
    error: str = ""
    seconds: float = 0.0
    peak_rss_mb: float | None = None
    by_other: bool = False  # cached: a concurrent builder committed it while we waited
    metrics: dict[str, Any] = field(default_factory=dict)  # of a failed node, for the report
    gates: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    report: list[dict[str, Any]] = field(default_factory=list)
    worker: str = ""  # who ran it: ``host:pid`` (and the Ray node, on a farm)
    attempts: tuple[dict[str, Any], ...] = ()  # earlier tries of this node whose worker died


def status_kb(key: str) -> int | None:
    """One ``/proc/self/status`` field in kB (``VmHWM``, ``RssAnon``), or None off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def peak_rss_mb(*, children: bool = True) -> float:
    """This process's peak resident memory, MB, or (``children``) its largest finished child's if
    that was larger (a stage that runs a step in a child process to return its memory): the one
    implementation the worker, stages and benches use.

    VmHWM first: it starts afresh at exec, while ru_maxrss carries a forking parent's pages over
    (a worker spawned by a parent that just held a big checkpoint would report the parent's peak;
    a child spawned by this process inherits only what this process held when it started it)."""
    hwm = status_kb("VmHWM")
    if hwm is None:  # not Linux: ru_maxrss, in KiB
        hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    own = hwm / 1024.0
    if not children:
        return own
    return max(own, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0)


class AnonPeak:
    """Peak anonymous resident memory (``RssAnon``) of this process, MB, sampled at 5 Hz by a
    daemon thread while a node runs. VmHWM also counts file-backed pages (a memory-mapped or
    page-cached weight file the kernel can drop under pressure): measured on a TensorRT-RTX CPU
    build of 1.4 GB of weights, VmHWM 3.17 GB, RssAnon 1.66 GB. The sampler sees a build's peak
    because the builder releases the GIL (75 of 94 samples landed inside it)."""

    def __init__(self, period: float = 0.2):
        import threading

        self.peak_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(period,), daemon=True)

    def _sample(self) -> None:
        kb = status_kb("RssAnon")
        if kb is not None:  # None off Linux: no figure
            self.peak_mb = max(self.peak_mb, kb / 1024.0)

    def _run(self, period: float) -> None:
        while not self._stop.wait(period):
            self._sample()

    def start(self) -> AnonPeak:
        self._sample()
        self._thread.start()
        return self

    def read(self) -> float:
        self._sample()
        return self.peak_mb

    def stop(self) -> None:
        self._stop.set()


def redirect_output(log: Path) -> None:
    """The stage's own prints and library warnings go to the node log, not the live display."""
    log.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.stdout = os.fdopen(1, "w", buffering=1, closefd=False)
    sys.stderr = os.fdopen(2, "w", buffering=1, closefd=False)


def main(spec: NodeSpec, conn: Any) -> None:
    """Process entry point: run the node, send progress and then its outcome over ``conn``."""
    redirect_output(Path(spec.log))

    def progress(msg: str, frac: float | None = None) -> None:
        print(f"{PROGRESS_MARK}{msg}", flush=True)
        try:
            conn.send(("progress", msg, frac))
        except (OSError, ValueError):  # a gone parent display must not fail the node
            pass

    outcome = run_logged(spec, progress)
    try:
        conn.send(("outcome", outcome))
    finally:
        conn.close()


def whoami() -> str:
    import socket

    return f"{socket.gethostname()}:{os.getpid()}"


def run_logged(spec: NodeSpec, progress: Any, worker: str = "") -> NodeOutcome:
    """``execute`` that always returns an outcome, stamped with who ran it (the one place the
    local pool's processes and a farm's tasks share)."""
    import dataclasses

    try:
        outcome = execute(spec, progress)
    except BaseException as e:  # noqa: BLE001 - never die without telling the parent why
        traceback.print_exc()
        outcome = NodeOutcome("failed", error=f"{type(e).__name__}: {e} (traceback in {spec.log})")
    return dataclasses.replace(outcome, worker=worker or whoami())


def _changed_externals(spec: NodeSpec, memo: Any) -> str | None:
    for path, sha in spec.external.items():
        p = Path(path)
        now = memo.sha256(p) if p.is_file() else "missing"
        if now != sha:
            return f"{path} changed while {spec.node_id} ran (keyed on {sha[:12]}, now {now[:12]}); build again"
    return None


def execute(spec: NodeSpec, progress: Any = lambda msg, frac=None: None) -> NodeOutcome:
    from filelock import FileLock

    from pipeline.cache import CacheStore
    from pipeline.stage import GateFailed, StageContext, StageError, missed_message, report_dicts

    store = CacheStore(Path(spec.cache_root))
    lock = store.lock_path(spec.key)
    lock.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(lock)), store.reading(list(spec.input_keys)):
        if not spec.force:
            found = store.lookup(spec.key)
            if found.hit:  # another process built it while we waited for the lock
                return NodeOutcome("cached", manifest=found.manifest, by_other=True)
        for name, folder in spec.inputs.items():  # replaced or damaged since the parent checked
            if not Path(folder).is_dir():
                return NodeOutcome("failed", error=f"input {name} ({folder}) vanished before {spec.node_id} ran")
        tmp = store.begin(spec.key)
        started = time.time()
        ctx = StageContext(
            node_id=spec.node_id,
            params=spec.params,
            inputs={k: Path(v) for k, v in spec.inputs.items()},
            out=tmp / "out",
            target=spec.target,
            external=[Path(p) for p in spec.external],
            progress=progress,
        )

        anon = AnonPeak().start()

        def timing() -> dict[str, float]:
            return {"seconds": round(time.time() - started, 3), "peak_rss_mb": round(peak_rss_mb(), 1),
                    "peak_anon_mb": round(anon.read(), 1)}

        def ended(status: str, **kw: Any) -> NodeOutcome:
            anon.stop()
            return NodeOutcome(status, seconds=round(time.time() - started, 3), peak_rss_mb=round(peak_rss_mb(), 1), **kw)

        try:
            stage = importlib.import_module(spec.module).STAGE
            result = stage.run(ctx)
            missing = [o for o in stage.outputs if not (ctx.out / o).exists()]
            if missing:
                raise StageError(f"stage {stage.name} did not write its declared outputs: {', '.join(missing)}")
            # the one place a returned missed gate fails its node (stages raise only to add context)
            if (missed := missed_message(result.gates)) is not None:
                raise GateFailed(missed, result)
            changed = _changed_externals(spec, store.memo)
            if changed:  # the key would describe other bytes than the ones the stage read
                raise StageError(changed)
            manifest = {
                "node": spec.node_id,
                "material": spec.material,
                "metrics": result.metrics,
                "gates": [g.__dict__ for g in result.gates],
                "notes": result.notes,
                "report": report_dicts(result.report),
                "timings": {**timing(), "started": started, "finished": time.time()},
            }
            manifest = store.commit(spec.key, tmp, manifest, replace=spec.force)
        except GateFailed as e:
            store.abort(tmp)
            r = e.result
            return ended("failed", error=str(e), metrics=r.metrics, notes=r.notes, gates=[g.__dict__ for g in r.gates],
                         report=report_dicts(r.report))
        except StageError as e:
            store.abort(tmp)
            return ended("failed", error=str(e))
        except BaseException as e:  # a crash: keep the traceback in the log, one line to the user
            store.abort(tmp)
            traceback.print_exc()
            return ended("failed", error=f"{type(e).__name__}: {e} (traceback in {spec.log})")
        return ended("ran", manifest=manifest)
