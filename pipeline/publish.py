"""A stable view of the latest build: `artifacts/out/<config>/<node>` -> the node's cache entry.

Each view is a relative symlink to the entry's read-only `out/` folder, swapped atomically per
node (a symlink renamed over a symlink). Not hard links: a second link to an external-data file
makes onnx-ir refuse to read it ("may indicate a hard link attack"), and a hard-linked file is
the cache itself under another name. Not file symlinks either: onnx refuses external data that
is a symlink. Through a folder link the files keep one link each and stay regular files, so
`onnx.load("artifacts/out/default/fuse/decoder.onnx")` works, costs no space, and an edit fails
on the read-only file instead of silently changing the cache.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

from pipeline.runner import NodeState


def _ours(dest: Path) -> bool:
    """May we replace what is at ``dest``? Our symlinks, and the hard-linked folders earlier
    versions published (every file a second link of a cache file). Anything else (a folder a
    user made there) is not ours to delete."""
    if dest.is_symlink():
        return True
    if not dest.is_dir():
        return False
    files = [p for p in dest.rglob("*") if not p.is_dir()]
    return all(p.is_file() and not p.is_symlink() and p.stat().st_nlink >= 2 for p in files)


def publish(states: list[NodeState], cache_out: dict[str, Path], dest_root: Path) -> list[str]:
    """Point each built node's view at its entry; returns notes on views left alone."""
    notes = []
    dest_root.mkdir(parents=True, exist_ok=True)
    for s in states:
        if s.manifest is None or s.node.id not in cache_out:
            continue
        dest = dest_root / s.node.id
        if s.status == "evicted":  # no outputs to show: a view of ours would point at nothing
            if dest.is_symlink():
                dest.unlink()
            continue
        if (dest.exists() or dest.is_symlink()) and not _ours(dest):
            notes.append(f"{dest} is not a view vlmforge made; left alone (the outputs are in {cache_out[s.node.id]})")
            continue
        link = dest_root / f".{s.node.id}.{uuid.uuid4().hex[:8]}"
        link.symlink_to(os.path.relpath(cache_out[s.node.id], dest_root))
        if dest.is_dir() and not dest.is_symlink():  # an old hard-linked view: move it aside first
            old = dest_root / f".{s.node.id}.old.{uuid.uuid4().hex[:8]}"
            os.rename(dest, old)
            os.replace(link, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(link, dest)
    return notes


def deliver(states: list[NodeState], cache_out: dict[str, Path], dest_root: Path, config_name: str) -> list[Path]:
    """Copy each built node's deliverables under ``dest_root`` (read-only), named by
    config, target and key, so a name always means the same bytes. Returns the paths."""
    done = []
    for s in states:
        if s.manifest is None or s.key is None or not s.node.stage.deliver or s.node.id not in cache_out \
                or s.status == "evicted":
            continue
        where = s.node.target.name if s.node.target else s.node.stage.name
        for rel in s.node.stage.deliver:
            src = cache_out[s.node.id] / rel
            if rel not in s.manifest["outputs"] or not src.is_file():
                continue
            dest = dest_root / f"{config_name}-{where}-{s.key[:16]}{Path(rel).suffix}"
            if not dest.is_file() or dest.stat().st_size != src.stat().st_size:
                dest_root.mkdir(parents=True, exist_ok=True)
                tmp = dest_root / f".{dest.name}.{uuid.uuid4().hex[:8]}.tmp"
                # A copy, not a hard link: cache files keep one link (onnx-ir refuses more) and a
                # package handed on (scp, tar) is the user's, independent of the cache.
                try:
                    shutil.copyfile(src, tmp)
                    tmp.chmod(0o444)
                    os.replace(tmp, dest)
                except OSError:
                    tmp.unlink(missing_ok=True)
                    raise
            done.append(dest)
    return done
