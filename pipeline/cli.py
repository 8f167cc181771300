"""`vlmforge` command line. Exit codes: 0 ok, 1 a stage or gate failed, 2 bad usage or config.

Only argparse is imported at module level so `vlmforge --help` is instant. The parser, the
build commands (plan, build, report) and the dispatch live here; the cache-maintenance
commands (show, gc, fsck) in ``pipeline.cli_cache``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import sys
from pathlib import Path
from typing import Any

from pipeline.artifacts import artifacts_root


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
    b.add_argument("-j", "--jobs", type=int, default=None,
                   help="nodes run at once (default 1 locally; with --executor ray, as many as the cluster's resources allow)")
    b.add_argument("--executor", choices=["local", "ray"], default="local",
                   help="local: a process per node on this machine; ray: a Ray task per node on a cluster")
    b.add_argument("--address", metavar="ADDR", help="with --executor ray: the cluster to join (default: RAY_ADDRESS, "
                                                    "else Ray on this machine alone)")
    b.add_argument("--node", action="append", default=[], metavar="ID",
                   help="run only this node (repeatable); its inputs must be in the (shared) cache")
    s = sub.add_parser("show", help="print a cache entry's manifest")
    s.add_argument("key", help="cache key (a unique prefix is enough)")
    g = sub.add_parser("gc", help="remove cache entries no lock file references, and stale temp folders")
    g.add_argument("--dry-run", action="store_true")
    g.add_argument("--json", action="store_true")
    e = sub.add_parser("evict", help="remove cache entries' outputs but keep their manifests: what was "
                                     "built from them stays cached; a build that needs them rebuilds them")
    e.add_argument("key", nargs="+", help="cache key (a unique prefix is enough; `vlmforge plan` shows them)")
    e.add_argument("--json", action="store_true")
    f = sub.add_parser("fsck", help="re-hash every cache entry; quarantine damaged ones (exit 1 if any)")
    f.add_argument("--json", action="store_true")
    r = sub.add_parser("report", help="print a build report again")
    r.add_argument("run", help="run folder, or a config name for its latest run")
    r.add_argument("--json", action="store_true")
    for module in _command_modules():  # commands the stage layer adds (e.g. device-side tools)
        importlib.import_module(module).register(sub)
    return p


def _command_modules() -> tuple[str, ...]:
    """VLMFORGE_COMMAND_MODULES (comma-separated) or the stage layer's ``COMMAND_MODULES``: each
    module's ``register(subparsers)`` adds subcommands whose ``func(args)`` returns the exit code.
    The spine names none of them; their modules keep heavy imports inside the commands."""
    env = os.environ.get("VLMFORGE_COMMAND_MODULES")
    if env is not None:
        return tuple(m.strip() for m in env.split(",") if m.strip())
    try:
        from stages import COMMAND_MODULES
    except ImportError:
        return ()
    return tuple(COMMAND_MODULES)


def _load(args: argparse.Namespace) -> tuple[Any, list[Any], Any, Path]:
    from pipeline.cache import CacheStore
    from pipeline.config import PrecisionPolicy
    from pipeline.config_io import load_config
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
    forced = getattr(args, "force", None) or []
    known = list(dict.fromkeys(n.stage.name for n in nodes))
    for name in forced:
        if name not in known:
            raise ConfigError(f"--force: no stage named {name!r} (stages: {', '.join(known)})")
    nodes = select(nodes, args.target, getattr(args, "until", None), getattr(args, "node", None) or ())
    _preflight(cfg, nodes)
    store = CacheStore(artifacts_root() / "cache")
    return cfg, nodes, store, config_path


def _preflight(cfg: Any, nodes: list[Any]) -> None:
    """Each stage's cheap input checks, before anything is keyed: bad input is exit 2."""
    from pipeline.errors import ConfigError
    from pipeline.stage import StageError

    for stage in dict.fromkeys(n.stage for n in nodes):
        if stage.preflight is not None:
            try:
                stage.preflight(cfg)
            except StageError as e:
                raise ConfigError(str(e)) from None


def cmd_plan(args: argparse.Namespace) -> int:
    from pipeline.runner import Planner

    cfg, nodes, store, _ = _load(args)
    states = Planner(cfg, nodes, store).plan()
    keep = ("id", "stage", "target", "deps", "key", "cached", "reason", "needs_host", "resources")
    rows = [{k: v for k, v in {**s.as_dict(), "deps": list(s.node.deps)}.items() if k in keep} for s in states]
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

    from pipeline.errors import ConfigError
    from pipeline.hashing import toolchain_versions
    from pipeline.progress import Progress
    from pipeline.publish import deliver, publish
    from pipeline.report import write_lock, write_report
    from pipeline.runner import Planner, build

    if args.jobs is not None and args.jobs < 1:
        raise ConfigError("-j/--jobs: expected a positive number of parallel nodes")
    if args.address and args.executor != "ray":
        raise ConfigError("--address: only with --executor ray")
    cfg, nodes, store, config_path = _load(args)
    jobs = args.jobs if args.jobs is not None or args.executor == "ray" else 1
    t0 = time.time()
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir = artifacts_root() / "runs" / cfg.name / f"{stamp}-{os.getpid()}"
    planner = Planner(cfg, nodes, store, force=frozenset(args.force))
    # --json: stdout carries the report alone; what libraries print meanwhile (Ray's notices of a
    # worker that died) goes to stderr
    chatter = contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext()
    with store.pinning(), chatter:  # pins: a concurrent `vlmforge gc` keeps what this build found or made
        pool = _executor(args)
        with Progress(list(planner.states.values()), enabled=not args.json) as prog:
            states = build(planner, jobs, run_dir, on_event=prog.event, on_progress=prog.message, pool=pool,
                           only=frozenset(args.node) if args.node else None)
        # the lock file first: once it names the keys, gc keeps them without our pins
        write_lock(artifacts_root() / "locks" / f"{cfg.name}.lock", config_path, states)
    cache_out = {s.node.id: store.out_dir(s.key) for s in states if s.key}
    view_notes = publish(states, cache_out, artifacts_root() / "out" / cfg.name)
    delivered = deliver(states, cache_out, artifacts_root() / "packages", cfg.name)
    failed = [s for s in states if s.status in ("failed", "skipped")]
    header = {
        "config": str(config_path), "config_name": cfg.name, "run_dir": str(run_dir),
        "started": datetime.datetime.fromtimestamp(t0).isoformat(timespec="seconds"),
        "wall_seconds": round(time.time() - t0, 3), "result": "failed" if failed else "ok",
        "executor": args.executor + (f" ({args.address})" if args.address else ""),
        "toolchain": toolchain_versions(("torch", "transformers", "onnx", "onnxruntime", "tensorrt-rtx-cu13-bindings")),
        "notes": view_notes,
        "delivered": [str(p) for p in delivered],
    }
    doc = write_report(run_dir, header, states)
    from pipeline.report_html import write_html_report

    write_html_report(run_dir, doc)
    _latest(run_dir)
    if args.json:
        print(json.dumps(doc, indent=2, default=str))
    else:
        from rich.console import Console

        c = Console(stderr=True, soft_wrap=True)  # an error stays one line, whatever the width
        ran = sum(s.status == "ran" for s in states)
        evicted = sum(s.status == "evicted" for s in states)
        c.print(f"{doc['result']}: {ran} ran, {sum(s.status == 'cached' for s in states)} cached, "
                + (f"{evicted} evicted (not needed), " if evicted else "")
                + f"{len(failed)} failed/skipped in {header['wall_seconds']:.1f}s; report: {run_dir / 'report.md'} (and report.html)")
        for s in states:
            if s.status == "failed":
                c.print(f"[bold red]FAILED[/] {s.node.id}: {s.error}", highlight=False)
    return 1 if failed else 0


def _executor(args: argparse.Namespace) -> Any:
    """None: the runner's local process pool. Ray only when asked (its import costs seconds)."""
    if args.executor != "ray":
        return None
    from pipeline.errors import ConfigError

    try:
        from pipeline.farm import RayPool
    except ImportError as e:
        raise ConfigError(f"--executor ray: Ray is not installed ({e}); pip install 'vlmforge[farm]'") from None
    try:
        return RayPool(args.address)
    except ConnectionError as e:
        raise ConfigError(f"--executor ray: cannot reach the cluster at {args.address or 'RAY_ADDRESS'} ({e})") from None


def _latest(run_dir: Path) -> None:
    link = run_dir.parent / "latest"
    tmp = run_dir.parent / f".latest.{os.getpid()}"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(run_dir.name)
    os.replace(tmp, link)


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
    from pipeline.cli_cache import cmd_evict, cmd_fsck, cmd_gc, cmd_show
    from pipeline.errors import VlmforgeError

    try:
        cmds = {"plan": cmd_plan, "build": cmd_build, "show": cmd_show, "gc": cmd_gc, "evict": cmd_evict, "fsck": cmd_fsck,
                "report": cmd_report}
        if args.cmd in cmds:
            return cmds[args.cmd](args)
        return int(args.func(args))
    except VlmforgeError as e:
        print(f"vlmforge: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("vlmforge: interrupted; committed cache entries are intact, partial ones are discarded", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
