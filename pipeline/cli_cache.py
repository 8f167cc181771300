"""The cache-maintenance commands of the `vlmforge` command line: ``show``, ``gc``, ``evict``, ``fsck``.

They work on the content-addressed store alone (``pipeline.cache``, ``pipeline.housekeeping``)
and never load a build config or the stages, unlike the build commands in ``pipeline.cli``,
which parses their arguments and dispatches to them. Each returns the exit code.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pipeline.artifacts import artifacts_root


def _one_key(store: object, prefix: str, cmd: str) -> str:
    from pipeline.cache import CacheStore
    from pipeline.errors import ConfigError

    assert isinstance(store, CacheStore)
    keys = [k for k in store.keys() if k.startswith(prefix)]
    if len(keys) != 1:
        raise ConfigError(f"{cmd}: {'no' if not keys else 'more than one'} cache entry matches {prefix!r}")
    return keys[0]


def cmd_show(args: argparse.Namespace) -> int:
    from pipeline.cache import CacheStore
    from pipeline.errors import ConfigError

    store = CacheStore(artifacts_root() / "cache")
    keys = [_one_key(store, args.key, "show")]
    found = store.lookup(keys[0])
    if not found.hit and not found.evicted:
        raise ConfigError(f"show: entry {keys[0]} is not usable: {found.reason}")
    if found.evicted:
        print(f"show: {keys[0]} is {found.reason}", file=sys.stderr)
    print(json.dumps(found.manifest, indent=2))
    return 0


def _lock_keys(lock: Path) -> set[str]:
    """Keys a lock file references. One that cannot be read stops gc: deleting what it might
    reference would lose a build."""
    import yaml

    from pipeline.errors import ConfigError

    try:
        doc = yaml.safe_load(lock.read_text()) or {}
        nodes = doc.get("nodes") or {} if isinstance(doc, dict) else None
        if not isinstance(nodes, dict):
            raise ValueError("no nodes table")
        keys = {n["key"] for n in nodes.values()}
        if not all(isinstance(k, str) for k in keys):
            raise ValueError("a node without a key")
        return keys
    except (OSError, yaml.YAMLError, ValueError, TypeError, KeyError, AttributeError) as e:
        raise ConfigError(f"{lock}: unreadable lock file ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                          "gc removed nothing (fix or delete that lock file)") from None


def cmd_gc(args: argparse.Namespace) -> int:
    from pipeline.cache import CacheStore
    from pipeline.housekeeping import gc

    root = artifacts_root()
    keep: set[str] = set()
    for lock in sorted((root / "locks").glob("*.lock")):
        keep |= _lock_keys(lock)
    res = gc(CacheStore(root / "cache"), keep, dry_run=args.dry_run)
    if args.json:
        print(json.dumps(res.as_dict(), indent=2))
    else:
        verb = "would remove" if args.dry_run else "removed"
        busy = f", {len(res.pinned)} more in use by a running build" if res.pinned else ""
        print(f"gc: {verb} {len(res.removed)} entries and {len(res.stale)} stale temp folders, "
              f"{res.freed_bytes / 1e6:.1f} MB; kept {len(keep)} entries referenced by lock files{busy}")
    return 0


def cmd_evict(args: argparse.Namespace) -> int:
    from pipeline.cache import CacheStore
    from pipeline.housekeeping import evict

    store = CacheStore(artifacts_root() / "cache")
    keys = list(dict.fromkeys(_one_key(store, k, "evict") for k in args.key))  # all resolve, or nothing is done
    res = evict(store, keys)
    if args.json:
        print(json.dumps(res.as_dict(), indent=2))
    else:
        for key, why in res.refused.items():
            print(f"evict: {key}: left as it was ({why})")
        print(f"evict: {len(res.evicted)} entries emptied, {res.freed_bytes / 1e9:.2f} GB freed; their manifests "
              "stay, so what was built from them stays cached")
    return 1 if res.refused else 0


def cmd_fsck(args: argparse.Namespace) -> int:
    from pipeline.cache import CacheStore
    from pipeline.housekeeping import fsck

    def progress(i: int, n: int, key: str) -> None:
        if not args.json and sys.stderr.isatty():
            print(f"\rfsck: {i + 1}/{n} {key}", end="", file=sys.stderr, flush=True)

    res = fsck(CacheStore(artifacts_root() / "cache"), progress)
    if args.json:
        print(json.dumps(res.as_dict(), indent=2))
    else:
        if sys.stderr.isatty():
            print(file=sys.stderr)
        for key, why in res.damaged.items():
            print(f"fsck: {key}: {why}; moved to .corrupt/, the next build rebuilds it")
        print(f"fsck: {res.checked} entries, {res.bytes_read / 1e6:.1f} MB re-read, {len(res.damaged)} damaged")
    return 1 if res.damaged else 0
