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


def timings_svg(nodes: Sequence[dict[str, Any]]) -> str:
    """Horizontal bars: seconds per node this run (cached nodes: what building them cost, hatched
    grey), as inline SVG. Written by hand, not with matplotlib: every build writes this chart,
    and a fully cached build must stay around a second, while importing matplotlib alone costs
    0.8 s on the 2-core machines; a bar chart is a few rectangles."""
    from html import escape

    rows = []
    for n in nodes:
        cached = n.get("status") == "cached"
        secs = float((n.get("built_seconds") if cached else n.get("seconds")) or 0.0)
        color = {"ran": "#2ca02c", "cached": "#7f7f7f", "failed": "#d62728"}.get(str(n.get("status")), "#ff7f0e")
        rows.append((str(n["id"]), secs, color, cached))
    top = max((r[1] for r in rows), default=0.0) or 1.0
    label_w, bar_w, h = 200, 460, 16
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" role="img" aria-label="seconds per node" '
             f'width="{label_w + bar_w + 60}" height="{h * len(rows) + 24}" font-size="11" font-family="sans-serif">',
             '<defs><pattern id="hatch" width="6" height="6" patternUnits="userSpaceOnUse" '
             'patternTransform="rotate(45)"><rect width="6" height="6" fill="#7f7f7f" opacity="0.5"/>'
             '<line x1="0" y1="0" x2="0" y2="6" stroke="#fff" stroke-width="2"/></pattern></defs>']
    for i, (name, secs, color, cached) in enumerate(rows):
        y, w = i * h + 2, max(1.0, bar_w * secs / top)
        fill = "url(#hatch)" if cached else color
        parts.append(f'<text x="{label_w - 6}" y="{y + 11}" text-anchor="end">{escape(name)}</text>'
                     f'<rect x="{label_w}" y="{y}" width="{w:.1f}" height="{h - 4}" fill="{fill}"/>'
                     f'<text x="{label_w + w + 4:.1f}" y="{y + 11}">{secs:.1f} s</text>')
    parts.append(f'<text x="{label_w}" y="{h * len(rows) + 18}" fill="#445">seconds (hatched: cached; the bar '
                 'shows the original build)</text></svg>')
    return "".join(parts)
