"""Live per-node progress on stderr (a rich table on a terminal, plain lines otherwise)."""

from __future__ import annotations

import sys
import time
from typing import Any

from pipeline.runner import NodeState

_STYLE = {"cached": "dim green", "ran": "green", "failed": "bold red", "skipped": "yellow", "running": "cyan", "evicted": "dim"}


class Progress:
    def __init__(self, states: list[NodeState], enabled: bool = True):
        from rich.console import Console

        self.console = Console(stderr=True, soft_wrap=True)  # one line per event in build-farm logs
        self.enabled = enabled
        self.live_mode = enabled and sys.stderr.isatty()
        self.states = {s.node.id: s for s in states}
        self.msgs: dict[str, str] = {}
        self.started: dict[str, float] = {}
        self.live: Any = None

    def _table(self) -> Any:
        from rich.table import Table

        t = Table(box=None, pad_edge=False)
        for col in ("node", "status", "time", "progress"):
            t.add_column(col)
        now = time.time()
        for nid, s in self.states.items():
            el = now - self.started[nid] if s.status == "running" and nid in self.started else s.seconds
            t.add_row(nid, f"[{_STYLE.get(s.status, '')}]{s.status}", f"{el:6.1f}s" if el else "",
                      (self.msgs.get(nid, "") if s.status == "running" else (s.error or ""))[:80])
        return t

    def __enter__(self) -> Progress:
        if self.live_mode:
            from rich.live import Live

            self.live = Live(self._table(), console=self.console, refresh_per_second=4, transient=False)
            self.live.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.live is not None:
            self.live.update(self._table())
            self.live.__exit__(*exc)

    def event(self, s: NodeState) -> None:
        if s.status == "running":
            self.started[s.node.id] = time.time()
        if self.live is not None:
            self.live.update(self._table())
        elif self.enabled and s.status != "pending":
            extra = f" ({s.seconds:.1f}s)" if s.status == "ran" else ""
            extra += f": {s.error}" if s.error else (f": {s.reason}" if s.status == "skipped" else "")
            self.console.print(f"[{_STYLE.get(s.status, '')}]{s.status:>8}[/] {s.node.id}{extra}", highlight=False)

    def message(self, nid: str, msg: str, frac: float | None) -> None:
        self.msgs[nid] = msg + (f" [{frac:.0%}]" if frac is not None else "")
        if self.live is not None:
            self.live.update(self._table())
