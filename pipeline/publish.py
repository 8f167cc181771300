"""A stable view of the latest build: `artifacts/out/<config>/<node>/` hard-linked to the cache.

Users and packaging scripts look here instead of at content-addressed keys. Hard links cost no
space; a file system without them gets copies. Replaced atomically per node.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

from pipeline.runner import NodeState


def publish(states: list[NodeState], cache_out: dict[str, Path], dest_root: Path) -> None:
    for s in states:
        if s.manifest is None or s.node.id not in cache_out:
            continue
        src = cache_out[s.node.id]
        dest = dest_root / s.node.id
        tmp = dest_root / f".{s.node.id}.{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True)
        for rel in s.manifest["outputs"]:
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(src / rel, tmp / rel)
            except OSError:
                shutil.copy2(src / rel, tmp / rel)
        old = dest_root / f".{s.node.id}.old.{uuid.uuid4().hex[:8]}"
        if dest.exists():
            os.rename(dest, old)
        os.rename(tmp, dest)
        shutil.rmtree(old, ignore_errors=True)
