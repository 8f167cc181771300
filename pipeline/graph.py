"""The build graph: stage declarations expanded into nodes (`stage` or `stage@target`)."""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterable
from dataclasses import dataclass

from pipeline.errors import ConfigError
from pipeline.stage import Stage
from pipeline.targets import TargetSpec


@dataclass(frozen=True)
class Node:
    id: str
    stage: Stage
    target: TargetSpec | None
    deps: tuple[str, ...]  # node ids
    module: str  # where the worker re-imports the stage from


def load_stages(modules: Iterable[str] | None = None) -> dict[str, tuple[str, Stage]]:
    if modules is None:
        # VLMFORGE_STAGE_MODULES (comma-separated) replaces the built-in list: a way to plug in
        # stages of your own, and how the tests run the graph on small synthetic stages.
        env = os.environ.get("VLMFORGE_STAGE_MODULES")
        if env:
            modules = [m.strip() for m in env.split(",") if m.strip()]
        else:
            from stages import STAGE_MODULES

            modules = STAGE_MODULES
    out: dict[str, tuple[str, Stage]] = {}
    for m in modules:
        stage = importlib.import_module(m).STAGE
        if stage.name in out:
            raise ConfigError(f"stage {stage.name!r} is declared twice ({out[stage.name][0]}, {m})")
        out[stage.name] = (m, stage)
    return out


def build_graph(stages: dict[str, tuple[str, Stage]], targets: list[TargetSpec]) -> list[Node]:
    """Nodes in a deterministic topological order; per-target stages fan out over targets."""
    nodes: dict[str, Node] = {}
    for name, (module, st) in stages.items():
        for dep in st.deps:
            if dep not in stages:
                raise ConfigError(f"stage {name!r} depends on unknown stage {dep!r}")
            if stages[dep][1].per_target and not st.per_target:
                raise ConfigError(f"stage {name!r} is not per-target but depends on per-target {dep!r}")
        for t in targets if st.per_target else [None]:
            deps = tuple(
                f"{d}@{t.name}" if (t is not None and stages[d][1].per_target) else d for d in st.deps
            )
            nid = f"{name}@{t.name}" if t is not None else name
            nodes[nid] = Node(nid, st, t, deps, module)
    return _toposort(nodes)


def _toposort(nodes: dict[str, Node]) -> list[Node]:
    order: list[Node] = []
    state: dict[str, int] = {}  # 1 = visiting, 2 = done

    def visit(nid: str, path: tuple[str, ...]) -> None:
        if state.get(nid) == 2:
            return
        if state.get(nid) == 1:
            raise ConfigError(f"dependency cycle: {' -> '.join((*path, nid))}")
        state[nid] = 1
        for d in nodes[nid].deps:
            visit(d, (*path, nid))
        state[nid] = 2
        order.append(nodes[nid])

    for nid in sorted(nodes):
        visit(nid, ())
    return order


def select(nodes: list[Node], targets: Iterable[str] = (), until: str | None = None,
           only: Iterable[str] = ()) -> list[Node]:
    """Restrict to some targets and/or to a stage (or ``only`` these node ids) and everything
    they need."""
    by_id = {n.id: n for n in nodes}
    wanted = set(targets)
    keep = [n for n in nodes if n.target is None or not wanted or n.target.name in wanted]
    roots: list[str] | None = None
    if until is not None:
        if until not in {n.stage.name for n in nodes}:
            raise ConfigError(f"--until: no stage named {until!r} (stages: {', '.join(stage_names(nodes))})")
        roots = [n.id for n in keep if n.stage.name == until]
    only = list(only)
    if only and until is not None:
        raise ConfigError("--node and --until: use one (--node names the nodes to run)")
    if only:
        kept = {n.id for n in keep}
        unknown = [i for i in only if i not in kept]
        if unknown:
            raise ConfigError(f"--node: no node {unknown[0]!r} in this build (nodes: {', '.join(sorted(kept))})")
        roots = only
    if roots is not None:
        need: set[str] = set()
        stack = list(roots)
        while stack:
            nid = stack.pop()
            if nid not in need:
                need.add(nid)
                stack.extend(by_id[nid].deps)
        keep = [n for n in keep if n.id in need]
    return keep


def stage_names(nodes: list[Node]) -> list[str]:
    return list(dict.fromkeys(n.stage.name for n in nodes))
