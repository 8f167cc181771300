"""`vlmforge` command line. Exit codes: 0 ok, 1 a stage or gate failed, 2 bad usage or config.

Only argparse is imported at module level so `vlmforge --help` is instant.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any


def artifacts_root() -> Path:
    return Path(os.environ.get("VLMFORGE_ARTIFACTS", "artifacts")).resolve()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vlmforge", description="Build verified TensorRT engines for Qwen-VL models.")
    sub = p.add_subparsers(dest="cmd", required=True)

    def config_cmd(name: str, help_: str) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=help_)
        c.add_argument("config", type=Path, help="YAML build config (e.g. configs/default.yaml)")
        c.add_argument("--target", action="append", default=[], metavar="T", help="only this target (repeatable)")
        c.add_argument("--precision", choices=["best", "fp8", "int8", "int4-weight", "fp16"],
                       help="override the precision policy of every graph")
        c.add_argument("--json", action="store_true", help="machine-readable output on stdout")
        return c

    config_cmd("plan", "show every node, its cache key, and whether it is cached (and why not)")
    b = config_cmd("build", "build the config's graph (cached nodes are reused)")
    b.add_argument("--until", metavar="STAGE", help="stop after this stage (and what it needs)")
    b.add_argument("--force", action="append", default=[], metavar="STAGE", help="re-run this stage's nodes")
    b.add_argument("-j", "--jobs", type=int, default=1, help="nodes run in parallel (default 1)")
    s = sub.add_parser("show", help="print a cache entry's manifest")
    s.add_argument("key", help="cache key (a unique prefix is enough)")
    g = sub.add_parser("gc", help="remove cache entries no lock file references, and stale temp folders")
    g.add_argument("--dry-run", action="store_true")
    g.add_argument("--json", action="store_true")
    r = sub.add_parser("report", help="print a build report again")
    r.add_argument("run", help="run folder, or a config name for its latest run")
    r.add_argument("--json", action="store_true")
    return p


def _load(args: argparse.Namespace) -> tuple[Any, list[Any], Any, Path]:
    from pipeline.cache import CacheStore
    from pipeline.config import PrecisionPolicy, load_config
    from pipeline.errors import ConfigError
    from pipeline.graph import build_graph, load_stages, select
    from pipeline.targets import check_precisions, load_catalog, targets_for

    cfg = load_config(args.config)
    config_path = args.config.resolve()
    catalog = load_catalog()
    if args.target:
        unknown = [t for t in args.target if t not in catalog]
        if unknown:
            raise ConfigError(f"--target: {unknown[0]!r} is not in the target catalog (known: {', '.join(sorted(catalog))})")
        cfg = cfg.model_copy(update={"targets": tuple(args.target)})
    if args.precision:
        cfg = cfg.model_copy(update={"precision": PrecisionPolicy(vision=args.precision, decoder=args.precision)})
    targets = targets_for(cfg, config_path, catalog)
    check_precisions(cfg, config_path, targets, catalog)
    nodes = build_graph(load_stages(), targets)
    nodes = select(nodes, args.target, getattr(args, "until", None))
    store = CacheStore(artifacts_root() / "cache")
    return cfg, nodes, store, config_path


def cmd_plan(args: argparse.Namespace) -> int:
    from pipeline.runner import Planner

    cfg, nodes, store, _ = _load(args)
    states = Planner(cfg, nodes, store).plan()
    rows = [{k: v for k, v in s.as_dict().items() if k in ("id", "stage", "target", "key", "cached", "reason", "needs_host")}
            for s in states]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"plan: {cfg.name}")
    for col in ("node", "key", "cached", "why not / needs"):
        t.add_column(col)
    for r in rows:
        why = r["reason"] + (f" [yellow](needs a GPU host: {r['needs_host']})" if r["needs_host"] else "")
        t.add_row(r["id"], (r["key"] or "(pending)")[:16], "yes" if r["cached"] else "no", why)
    Console().print(t)
    return 0


def cmd_build(args: argparse.Namespace) -> int:
    import datetime
    import time

    from pipeline.hashing import toolchain_versions
    from pipeline.progress import Progress
    from pipeline.publish import publish
    from pipeline.report import write_lock, write_report
    from pipeline.runner import Planner, build

    if args.jobs < 1:
        from pipeline.errors import ConfigError

        raise ConfigError("-j/--jobs: expected a positive number of parallel nodes")
    cfg, nodes, store, config_path = _load(args)
    t0 = time.time()
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir = artifacts_root() / "runs" / cfg.name / f"{stamp}-{os.getpid()}"
    planner = Planner(cfg, nodes, store, force=frozenset(args.force))
    with Progress(list(planner.states.values()), enabled=not args.json) as prog:
        states = build(planner, args.jobs, run_dir, on_event=prog.event, on_progress=prog.message)
    failed = [s for s in states if s.status in ("failed", "skipped")]
    header = {
        "config": str(config_path), "config_name": cfg.name, "run_dir": str(run_dir),
        "started": datetime.datetime.fromtimestamp(t0).isoformat(timespec="seconds"),
        "wall_seconds": round(time.time() - t0, 3), "result": "failed" if failed else "ok",
        "toolchain": toolchain_versions(("torch", "transformers", "onnx", "onnxruntime", "tensorrt-rtx-cu13-bindings")),
    }
    doc = write_report(run_dir, header, states)
    from pipeline.report_html import write_html_report

    write_html_report(run_dir, doc, store.root)
    _latest(run_dir)
    write_lock(artifacts_root() / "locks" / f"{cfg.name}.lock", config_path, states)
    publish(states, {s.node.id: store.out_dir(s.key) for s in states if s.key}, artifacts_root() / "out" / cfg.name)
    if args.json:
        print(json.dumps(doc, indent=2, default=str))
    else:
        from rich.console import Console

        c = Console(stderr=True, soft_wrap=True)  # an error stays one line, whatever the width
        ran = sum(s.status == "ran" for s in states)
        c.print(f"{doc['result']}: {ran} ran, {sum(s.status == 'cached' for s in states)} cached, "
                f"{len(failed)} failed/skipped in {header['wall_seconds']:.1f}s; report: {run_dir / 'report.md'} (and report.html)")
        for s in states:
            if s.status == "failed":
                c.print(f"[bold red]FAILED[/] {s.node.id}: {s.error}", highlight=False)
    return 1 if failed else 0


def _latest(run_dir: Path) -> None:
    link = run_dir.parent / "latest"
    tmp = run_dir.parent / f".latest.{os.getpid()}"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(run_dir.name)
    os.replace(tmp, link)


def cmd_show(args: argparse.Namespace) -> int:
    from pipeline.cache import CacheStore
    from pipeline.errors import ConfigError

    store = CacheStore(artifacts_root() / "cache")
    keys = [k for k in store.keys() if k.startswith(args.key)]
    if len(keys) != 1:
        raise ConfigError(f"show: {'no' if not keys else 'more than one'} cache entry matches {args.key!r}")
    found = store.lookup(keys[0])
    if not found.hit:
        raise ConfigError(f"show: entry {keys[0]} is not usable: {found.reason}")
    print(json.dumps(found.manifest, indent=2))
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    import yaml

    from pipeline.cache import CacheStore

    root = artifacts_root()
    keep: set[str] = set()
    for lock in sorted((root / "locks").glob("*.lock")):
        doc = yaml.safe_load(lock.read_text()) or {}
        keep |= {n["key"] for n in (doc.get("nodes") or {}).values()}
    res = CacheStore(root / "cache").gc(keep, dry_run=args.dry_run)
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        verb = "would remove" if args.dry_run else "removed"
        print(f"gc: {verb} {len(res['removed'])} entries and {len(res['stale'])} stale temp folders, "
              f"{res['freed_bytes'] / 1e6:.1f} MB; kept {len(keep)} entries referenced by lock files")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from pipeline.errors import ConfigError

    run = Path(args.run)
    if not run.is_dir():
        run = artifacts_root() / "runs" / args.run / "latest"
    f = run / ("report.json" if args.json else "report.md")
    if not f.is_file():
        raise ConfigError(f"report: no report at {f}")
    sys.stdout.write(f.read_text())
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from pipeline.errors import VlmforgeError

    try:
        return {"plan": cmd_plan, "build": cmd_build, "show": cmd_show, "gc": cmd_gc, "report": cmd_report}[args.cmd](args)
    except VlmforgeError as e:
        print(f"vlmforge: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("vlmforge: interrupted; committed cache entries are intact, partial ones are discarded", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
