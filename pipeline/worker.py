"""Runs one node in a fresh worker process: lock the key, run the stage, commit atomically.

A fresh process per node (spawned, one task per child) gives each node its own peak-RSS figure,
keeps a crashing stage from taking the build down, and keeps torch out of the parent.
"""

from __future__ import annotations

import importlib
import os
import resource
import sys
import time
import traceback
from pathlib import Path
from typing import Any


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def execute(spec: dict[str, Any]) -> dict[str, Any]:
    """spec: key, node_id, module, params, inputs, external, target, cache_root, material, log, queue."""
    from filelock import FileLock

    from pipeline.cache import CacheStore
    from pipeline.stage import GateFailed, StageContext, StageError

    log = Path(spec["log"])
    log.parent.mkdir(parents=True, exist_ok=True)
    # The stage's own prints and library warnings go to the node log, not the live display.
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.stdout = os.fdopen(1, "w", buffering=1, closefd=False)
    sys.stderr = os.fdopen(2, "w", buffering=1, closefd=False)

    queue = spec.get("queue")
    node_id = spec["node_id"]

    def progress(msg: str, frac: float | None = None) -> None:
        print(f"[progress] {msg}", flush=True)
        if queue is not None:
            try:
                queue.put((node_id, msg, frac))
            except Exception:  # a gone display must not fail the build
                pass

    store = CacheStore(Path(spec["cache_root"]))
    key = spec["key"]
    lock = store.lock_path(key)
    lock.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(lock)):
        if spec.get("force"):
            store.evict(key)
        found = store.lookup(key)
        if found.hit:  # another process built it while we waited for the lock
            return {"status": "cached", "manifest": found.manifest, "by_other": True}
        tmp = store.begin(key)
        started = time.time()
        ctx = StageContext(
            node_id=node_id,
            params=spec["params"],
            inputs={k: Path(v) for k, v in spec["inputs"].items()},
            out=tmp / "out",
            target=spec["target"],
            external=[Path(p) for p in spec["external"]],
            progress=progress,
        )
        stage = importlib.import_module(spec["module"]).STAGE
        timing = lambda: {"seconds": round(time.time() - started, 3), "peak_rss_mb": round(_peak_rss_mb(), 1)}  # noqa: E731
        try:
            result = stage.run(ctx)
            missing = [o for o in stage.outputs if not (ctx.out / o).exists()]
            if missing:
                raise StageError(f"stage {stage.name} did not write its declared outputs: {', '.join(missing)}")
            missed = [g for g in result.gates if not g.passed]
            if missed:  # a stage that returns a missed gate instead of raising still fails
                what = "; ".join(f"{g.name} {g.value:.6g} (needs {g.op} {g.threshold:g})" for g in missed)
                raise GateFailed(f"parity gate missed: {what}", result)
        except GateFailed as e:
            store.abort(tmp)
            r = e.result
            return {"status": "failed", "error": str(e), "metrics": r.metrics, "notes": r.notes,
                    "gates": [g.__dict__ for g in r.gates], **timing()}
        except StageError as e:
            store.abort(tmp)
            return {"status": "failed", "error": str(e), **timing()}
        except BaseException as e:  # a crash: keep the traceback in the log, one line to the user
            store.abort(tmp)
            traceback.print_exc()
            return {"status": "failed", "error": f"{type(e).__name__}: {e} (traceback in {log})", **timing()}
        manifest = {
            "node": node_id,
            "material": spec["material"],
            "metrics": result.metrics,
            "gates": [g.__dict__ for g in result.gates],
            "notes": result.notes,
            "timings": {**timing(), "started": started, "finished": time.time()},
        }
        manifest = store.commit(key, tmp, manifest)
        return {"status": "ran", "manifest": manifest, **timing()}
