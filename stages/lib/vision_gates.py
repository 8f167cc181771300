"""A vision export's gate miss raised as GateFailed, one line (the ViT and the CNN exports);
the checks themselves come from ``stages.lib.metrics.gate_checks``, the one gate builder."""

from __future__ import annotations

from typing import Any

from pipeline.stage import GateCheck, GateFailed, StageResult


def finish(metrics: dict[str, Any], checks: list[GateCheck], notes: list[str]) -> StageResult:
    result = StageResult(metrics=metrics, gates=checks, notes=notes)
    failed = [c for c in checks if not c.passed]
    if failed:
        c = failed[0]
        raise GateFailed(f"vision parity gate {c.name} = {c.value:.6g} (needs {c.op} {c.threshold:g})"
                         + (f" and {len(failed) - 1} more" if len(failed) > 1 else ""), result)
    return result
