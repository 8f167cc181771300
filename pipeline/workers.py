"""The parent's side of the worker processes: start one per node, collect what they send.

Written on ``multiprocessing.Process`` and one pipe per node rather than a process pool on
purpose: a ``ProcessPoolExecutor`` marks itself broken when any worker dies and fails every
running and queued node with it (``BrokenProcessPool``). Here a dead process fails its node only.
"""

from __future__ import annotations

import signal
from multiprocessing.connection import wait
from typing import Any, Protocol

from pipeline.worker import NodeOutcome, NodeSpec


class Executor(Protocol):
    """What the runner needs of an executor: this module's ``WorkerPool`` (a process per node on
    this machine) or ``pipeline.farm.RayPool`` (a Ray task per node on a cluster)."""

    running: Any  # the nodes started and not yet collected (only its size is read)

    def unplaceable(self, states: list[Any]) -> dict[str, str]:
        """node id -> one line, for the nodes this executor can never run (checked before any starts)."""
        ...

    def start(self, state: Any, spec: NodeSpec) -> None: ...

    def poll(self, timeout: float, on_progress: Any) -> list[tuple[Any, NodeOutcome]]:
        """Wait up to ``timeout``; return the nodes that finished, with their outcomes."""
        ...

    def stop(self) -> None: ...


def _death(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        hint = " (out of memory? the kernel's OOM killer sends SIGKILL)" if -exitcode == signal.SIGKILL else ""
        return f"worker process was killed by {name}{hint}"
    return f"worker process exited with code {exitcode} before reporting a result"


class WorkerPool:
    def __init__(self, ctx: Any):
        self.ctx = ctx
        self.running: dict[Any, tuple[Any, Any, Any]] = {}  # process -> (state, conn, outcome)

    def unplaceable(self, states: list[Any]) -> dict[str, str]:
        """This machine runs whatever it is given (a node that needs another host says so itself)."""
        return {}

    def start(self, state: Any, spec: NodeSpec) -> None:
        from pipeline import worker

        recv, send = self.ctx.Pipe(duplex=False)
        proc = self.ctx.Process(target=worker.main, args=(spec, send), name=f"vlmforge:{spec.node_id}")
        proc.start()
        send.close()  # the child holds the only write end: EOF here means it is gone
        self.running[proc] = (state, recv, None)

    def poll(self, timeout: float, on_progress: Any) -> list[tuple[Any, NodeOutcome]]:
        """Wait up to ``timeout`` for messages or exits; return the nodes that finished."""
        conns = [c for _, c, _ in self.running.values()]
        wait(conns + [p.sentinel for p in self.running], timeout=timeout)
        done = []
        for proc, (state, conn, outcome) in list(self.running.items()):
            outcome = self._drain(state, conn, outcome, on_progress)
            self.running[proc] = (state, conn, outcome)
            if proc.is_alive() and outcome is None:
                continue
            proc.join(timeout=None if outcome is None else 30)
            outcome = self._drain(state, conn, outcome, on_progress)
            conn.close()
            del self.running[proc]
            done.append((state, outcome or NodeOutcome("failed", error=_death(proc.exitcode))))
        return done

    @staticmethod
    def _drain(state: Any, conn: Any, outcome: NodeOutcome | None, on_progress: Any) -> NodeOutcome | None:
        try:
            while conn.poll():
                msg = conn.recv()
                if msg[0] == "progress":
                    on_progress(state.node.id, msg[1], msg[2])
                elif msg[0] == "outcome":
                    outcome = msg[1]
        except (EOFError, OSError):
            pass
        return outcome

    def stop(self) -> None:
        """On an interrupt: stop what still runs (its temp folder is never committed)."""
        for proc, (_, conn, _) in list(self.running.items()):
            proc.terminate()
            proc.join(10)
            if proc.is_alive():
                proc.kill()
                proc.join()
            conn.close()
        self.running.clear()
