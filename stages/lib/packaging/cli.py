"""`vlmforge package CONFIG [--target T ...]`: build the config's device packages.

The same graph as `vlmforge build CONFIG --until package` (cached nodes are reused): one archive
per target, delivered to `artifacts/packages/<config>-<target>-<key16>.tar`.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def register(sub: Any) -> None:
    p = sub.add_parser("package", help="build one device package per target (build --until package)")
    p.add_argument("config", type=Path, help="YAML build config")
    p.add_argument("--target", action="append", default=[], metavar="T", help="only this target (repeatable)")
    p.add_argument("-j", "--jobs", type=int, default=1, help="nodes run in parallel (default 1)")
    p.add_argument("--json", action="store_true", help="machine-readable build result on stdout")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pipeline.cli import main

    argv = ["build", str(args.config), "--until", "package", "-j", str(args.jobs)]
    argv += [a for t in args.target for a in ("--target", t)]
    return main([*argv, *(["--json"] if args.json else [])])
