"""Cache key material of a node: what, with which params, on which inputs, with which tools."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.config import BuildConfig
from pipeline.graph import Node
from pipeline.hashing import HashMemo, digest, toolchain_versions


def node_params(node: Node, cfg: BuildConfig) -> dict[str, Any]:
    return node.stage.params(cfg, node.target)


def external_files(node: Node, cfg: BuildConfig) -> list[Path]:
    """The files outside the cache the node reads; a declaration that cannot be made (a symlink
    out of the input folder, an unreadable folder) is bad input: one line, exit 2."""
    from pipeline.errors import ConfigError
    from pipeline.stage import StageError

    if not node.stage.external:
        return []
    try:
        return sorted(node.stage.external(cfg))
    except (StageError, OSError) as e:
        raise ConfigError(f"{node.id}: {e}") from None


def key_material(
    node: Node,
    cfg: BuildConfig,
    dep_outputs: dict[str, dict[str, Any]],  # dep node id -> its manifest "outputs"
    memo: HashMemo,
) -> dict[str, Any]:
    st = node.stage
    ext: dict[str, str] = {}
    for p in external_files(node, cfg):
        ext[str(p)] = memo.sha256(p) if p.is_file() else "missing"
    return {
        "stage": st.name,
        "stage_version": st.version,
        "params": node_params(node, cfg),
        # by dep *stage* name, so two targets sharing work (key_uses_target=False) agree
        "inputs": {d.split("@")[0]: {k: v["sha256"] for k, v in sorted(o.items())} for d, o in dep_outputs.items()},
        "external": ext,
        "target": node.target.model_dump() if (node.target is not None and st.key_uses_target) else None,
        "toolchain": toolchain_versions(st.toolchain),
    }


def cache_key(material: dict[str, Any]) -> str:
    return digest(material)[:32]
