"""Build report (`report.json` + `report.md` in the run folder) and the per-config lock file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.errors import OutputError
from pipeline.fsutil import atomic_write_text
from pipeline.runner import NodeState

# Every file written here goes through pipeline.fsutil: a full disk is one line and exit 1, the
# previous report / lock file stays as it was and no temp file is left behind.


def write_lock(path: Path, config_path: Path, states: list[NodeState]) -> None:
    """dvc.lock-style: node -> key and outputs; sorted, so two builds diff line by line."""
    import yaml

    prev: dict[str, Any] = {}
    if path.is_file():
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except OSError as e:
            raise OutputError(f"{path}: cannot read the previous lock file ({e.strerror or e})") from None
        except (yaml.YAMLError, UnicodeDecodeError):
            loaded = {}
        prev = (loaded.get("nodes") if isinstance(loaded, dict) else None) or {}
        if not isinstance(prev, dict):
            prev = {}
    nodes = dict(prev)  # a partial build (--target/--until) keeps the other nodes' entries
    for s in states:
        if s.manifest is None or s.key is None:
            continue
        nodes[s.node.id] = {
            "stage": s.node.stage.name,
            "target": s.node.target.name if s.node.target else None,
            "key": s.key,
            "outs": {k: {"sha256": v["sha256"], "bytes": v["bytes"]} for k, v in sorted(s.manifest["outputs"].items())},
        }
    doc = {"schema": 1, "config": str(config_path), "nodes": dict(sorted(nodes.items()))}
    atomic_write_text(path, yaml.safe_dump(doc, sort_keys=False))


def summarize(states: list[NodeState]) -> dict[str, int]:
    out: dict[str, int] = {}
    for s in states:
        out[s.status] = out.get(s.status, 0) + 1
    return out


def write_report(run_dir: Path, header: dict[str, Any], states: list[NodeState]) -> dict[str, Any]:
    doc = {**header, "summary": summarize(states), "nodes": [s.as_dict() for s in states]}
    atomic_write_text(run_dir / "report.json", json.dumps(doc, indent=2, default=str))
    atomic_write_text(run_dir / "report.md", render_markdown(doc))
    return doc


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, dict | list):
        return json.dumps(v, default=str)[:120]
    return str(v)


def _flat(prefix: str, d: dict[str, Any], out: dict[str, Any]) -> dict[str, Any]:
    for k, v in d.items():
        if isinstance(v, dict):
            _flat(f"{prefix}{k}.", v, out)
        else:
            out[f"{prefix}{k}"] = v
    return out


def render_markdown(doc: dict[str, Any]) -> str:
    lines = [
        f"# vlmforge build report: {doc.get('config_name', '')}",
        "",
        f"- config: `{doc.get('config')}`",
        f"- started: {doc.get('started')}, wall seconds: {doc.get('wall_seconds')}",
        f"- result: **{doc.get('result')}** ({', '.join(f'{k}: {v}' for k, v in doc['summary'].items())})",
        f"- executor: {doc.get('executor', 'local')}",
        f"- toolchain: {', '.join(f'{k} {v}' for k, v in doc.get('toolchain', {}).items())}",
        "",
        "## Nodes",
        "",
        "| node | status | seconds | peak RSS MB | worker | key | outputs | note |",
        "|---|---|---:|---:|---|---|---|---|",
    ]
    for n in doc["nodes"]:
        # the largest outputs first (engines, graphs), so the table names what matters
        ranked = sorted(n["outputs"].items(), key=lambda kv: -kv[1]["bytes"])
        outs = ", ".join(f"{k} ({v['bytes']:,} B)" for k, v in ranked[:6])
        if len(ranked) > 6:
            outs += f", +{len(ranked) - 6} more"
        note = n["error"] or n["reason"] or ""
        if n["status"] == "cached" and n.get("built_seconds") is not None:
            note = f"cache hit (built in {n['built_seconds']:.1f} s, {n['built_peak_rss_mb'] or 0:.0f} MB) {note}".strip()
        rss = "" if n["peak_rss_mb"] is None else f"{n['peak_rss_mb']:.0f}"
        status = "cached" if n["status"] == "cached" else n["status"]
        lines.append(
            f"| {n['id']} | {status} | {n['seconds']:.2f} | {rss} | {n.get('worker') or ''} | `{(n['key'] or '-')[:12]}` "
            f"| {outs} | {note} |"
        )
    for n in doc["nodes"]:
        if not (n["metrics"] or n["gates"] or n["notes"]):
            continue
        lines += ["", f"### {n['id']}", ""]
        if n["metrics"]:
            lines += ["| metric | value |", "|---|---:|"]
            lines += [f"| {k} | {_fmt(v)} |" for k, v in _flat("", n["metrics"], {}).items()]
        if n["gates"]:
            lines += ["", "| gate | value | needs | ok |", "|---|---:|---|---|"]
            lines += [
                f"| {g['name']} | {g['value']:.6g} | {g['op']} {g['threshold']:g} | {'yes' if g['passed'] else '**NO**'} |"
                for g in n["gates"]
            ]
        lines += [f"- {x}" for x in n["notes"]]
    return "\n".join(lines) + "\n"
