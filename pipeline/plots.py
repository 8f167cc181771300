"""PNG figures for the build report and the verify stage (matplotlib, Agg: no display needed).

matplotlib is imported inside the functions: ``import pipeline`` must stay light.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def save_png(path: str | os.PathLike[str], png: bytes) -> Path:
    """Write a figure from this module to ``path`` atomically (``pipeline.fsutil``): a full
    disk raises ``OutputError`` (one line) and leaves no half-written PNG or temp file."""
    from pipeline.fsutil import atomic_write_bytes

    return atomic_write_bytes(path, png)


def _figure(**kw: Any) -> Any:
    """A figure with no pyplot: no global figure state and no GUI backend to pick, and the
    import costs half of pyplot's (a cached build writes a report in about a second; pyplot
    alone took 1.1 s here)."""
    from matplotlib.figure import Figure

    return Figure(**kw)


def block_errors_png(rows: Sequence[dict[str, Any]], title: str, jump: int | None = None) -> bytes:
    """Per-block rel-L2 (left) and 1 - cosine (right, log) vs PyTorch; the first jump marked."""
    ok = [r for r in rows if r.get("cosine") is not None and r.get("rel_l2") is not None]
    xs = [int(r["block"]) for r in ok]
    fig = _figure(figsize=(8, 3), dpi=100)
    ax1, ax2 = fig.subplots(1, 2)
    ax1.plot(xs, [float(r["rel_l2"]) for r in ok], "o-", color="tab:red")
    ax1.set_ylabel("rel L2")
    ax2.plot(xs, [max(1 - float(r["cosine"]), 1e-16) for r in ok], "s-", color="tab:blue")
    ax2.set_yscale("log")
    ax2.set_ylabel("1 - cosine")
    for ax in (ax1, ax2):
        ax.set_xlabel("block")
        if xs:
            ax.set_xticks(xs)
        if jump is not None:
            ax.axvline(jump, color="k", ls=":", lw=1.2, label=f"first jump: block {jump}")
    if jump is not None:
        ax1.legend(fontsize=8, loc="upper left")
    fig.suptitle(title, fontsize=9)
    return _png(fig)


def timings_png(nodes: Sequence[dict[str, Any]]) -> bytes:
    """Horizontal bars: seconds per node this run (cached nodes: what building them cost, hatched)."""
    names = [str(n["id"]) for n in nodes]
    fig = _figure(figsize=(7, 0.28 * len(names) + 1.0), dpi=100)
    ax = fig.subplots()
    for i, n in enumerate(nodes):
        cached = n.get("status") == "cached"
        secs = float((n.get("built_seconds") if cached else n.get("seconds")) or 0.0)
        color = {"ran": "tab:green", "cached": "tab:gray", "failed": "tab:red"}.get(str(n.get("status")), "tab:orange")
        ax.barh(i, secs, color=color, hatch="//" if cached else None, alpha=0.6 if cached else 1.0)
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("seconds (hatched: cached; bar shows the original build)")
    return _png(fig)
