"""The contract between the build graph and a stage module.

A stage module under ``stages/`` defines one module-level ``STAGE = Stage(...)``. The graph
reads only the declaration (cheap: no torch import); the runner imports the module again in
a fresh worker process and calls ``STAGE.run(ctx)`` there. A stage reads only ``ctx.inputs``
(the output folders of the nodes it depends on) and ``ctx.params`` and writes only into
``ctx.out``; everything else it would need must be declared, or the cache key would lie.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.config import BuildConfig
    from pipeline.resources import NodeResources
    from pipeline.targets import TargetSpec

ParamsFn = Callable[["BuildConfig", "TargetSpec | None"], dict[str, Any]]
ExternalFn = Callable[["BuildConfig"], list[Path]]
ResourcesFn = Callable[["BuildConfig", "TargetSpec | None"], "NodeResources"]


@dataclass(frozen=True)
class Stage:
    name: str
    version: str  # bump when the stage's code changes what it writes: part of the cache key
    run: Callable[[StageContext], StageResult]
    params: ParamsFn  # pure function of the config (and target): the params part of the key
    deps: tuple[str, ...] = ()  # upstream stage names; per-target deps resolve to the same target
    outputs: tuple[str, ...] = ()  # files or folders (relative to ctx.out) the stage must write
    per_target: bool = False  # fan out as ``name@target``
    # A per-target stage whose work does not depend on the target itself (only on params
    # resolved from it, e.g. the precision) sets this False: two targets asking for the same
    # work then share one cache entry and the work runs once.
    key_uses_target: bool = True
    toolchain: tuple[str, ...] = ()  # distributions whose versions enter the key
    # Outputs handed to the user after a build (e.g. a device package): linked read-only into
    # `artifacts/packages/<config>-<target or stage>-<key16><suffix>`, a name that changes with the key.
    deliver: tuple[str, ...] = ()
    # Files outside the cache the stage reads (a user checkpoint, a calibration folder): their
    # contents enter the key. Declared, so a stage never reads an undeclared file.
    external: ExternalFn | None = None
    description: str = ""
    # Cheap checks of what the stage will read (headers, not weights), run by `plan` and `build`
    # before anything is keyed or runs: raise StageError with one line naming the file and what
    # was expected, and the CLI exits 2 with nothing built.
    preflight: Callable[[BuildConfig], None] | None = None
    # Declares that the node cannot run on this machine (e.g. full TensorRT without a GPU);
    # returns the reason or None. Shown by `plan`; the node still runs and fails clearly.
    needs_host: Callable[[BuildConfig, TargetSpec | None], str | None] | None = None
    # Sections this stage fills in the HTML report, as (title, what the section says when no
    # node filled it). A node of this stage that ended with nothing for a section (failed,
    # skipped) gets a row there saying why: a check that did not run never looks like a pass.
    report_sections: tuple[tuple[str, str], ...] = ()
    # What one node needs from the machine that runs it (CPUs, expected peak memory, hardware a
    # worker must advertise): cheap, from headers and sizes. Shown by `plan --json`, reserved by
    # the Ray executor. None: one CPU, no memory reservation.
    resources: ResourcesFn | None = None


@dataclass(frozen=True)
class GateCheck:
    """One parity figure against its threshold."""

    name: str  # e.g. "vision.cosine"
    value: float
    threshold: float
    op: str  # ">=" or "<="
    passed: bool

    @staticmethod
    def check(name: str, value: float, threshold: float, op: str = ">=") -> GateCheck:
        ok = (value >= threshold) if op == ">=" else (value <= threshold)
        if value != value:  # NaN never passes
            ok = False
        return GateCheck(name, float(value), float(threshold), op, bool(ok))

    def describe(self) -> str:
        """``name value (needs op threshold)``: how a failure message and the worker name a check."""
        shown = f"{self.value:.6g}"
        if shown == f"{self.threshold:.6g}" and self.value != self.threshold:  # a near miss: "1 (needs >= 1)"
            shown = repr(self.value)  # would not say why it missed
        return f"{self.name} {shown} (needs {self.op} {self.threshold:g})"


def missed_message(checks: Iterable[GateCheck], head: str = "parity gate missed", hint: str = "") -> str | None:
    """One line naming every missed check (None when all passed): ``head: a; b[; hint]``. A stage
    that has context for the failure (where the error jumps, what to change) passes it as ``hint``
    and raises GateFailed with this; without any, it returns the gates and the worker fails the node
    with the same line. Newlines in ``hint`` are flattened: errors are printed as one line."""
    missed = [c.describe() for c in checks if not c.passed]
    if not missed:
        return None
    line = f"{head}: {'; '.join(missed)}" + (f"; {hint}" if hint else "")
    return " ".join(line.splitlines())


@dataclass(frozen=True)
class ReportTable:
    """Rows a stage adds to a section of the HTML report. The rows of every node with the same
    section title make one table (the node's id first); cells are JSON scalars."""

    section: str
    columns: tuple[str, ...]
    rows: tuple[tuple[Any, ...], ...]
    status: tuple[str, ...] = ()  # per row, when rows are checks: pass | fail | not-run | ungated
    note: str = ""  # one paragraph under the table (what the figures mean, how to gate them)


@dataclass(frozen=True)
class ReportFigure:
    """A per-block error plot (cosine, rel_l2, max_abs per block) in a section of the report."""

    section: str
    title: str
    caption: str
    points: tuple[dict[str, Any], ...]  # {"block": i, "cosine": ..., "rel_l2": ..., "max_abs": ...}
    mark: int | None = None  # the block where the error jumps


def report_dicts(parts: Iterable[ReportTable | ReportFigure]) -> list[dict[str, Any]]:
    """The JSON form kept in the manifest and report.json ("kind" says which part it is)."""
    from dataclasses import asdict

    return [{"kind": "table" if isinstance(p, ReportTable) else "figure", **asdict(p)} for p in parts]


@dataclass
class StageResult:
    metrics: dict[str, Any] = field(default_factory=dict)  # JSON-able; lands in manifest + report
    gates: list[GateCheck] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # human remarks for the report
    report: list[ReportTable | ReportFigure] = field(default_factory=list)  # report sections' content


class StageError(Exception):
    """A stage failed for a reason the user can act on: printed as one line, exit 1."""


class GateFailed(StageError):
    def __init__(self, message: str, result: StageResult):
        super().__init__(message)
        self.result = result


@dataclass
class StageContext:
    node_id: str
    params: dict[str, Any]
    inputs: Mapping[str, Path]  # dep stage name -> its committed output folder (read-only)
    out: Path  # write outputs here (a temp folder, committed atomically after run)
    target: dict[str, Any] | None  # the target's catalog entry, if per-target
    external: list[Path]
    progress: Callable[[str, float | None], None] = field(default=lambda msg, frac: None)

    def report(self, message: str, fraction: float | None = None) -> None:
        """Live progress line for this node (fraction in [0, 1] when known)."""
        self.progress(message, fraction)
