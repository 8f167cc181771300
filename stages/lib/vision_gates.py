"""How a vision export is gated: figures against the export gate, a miss raised as GateFailed
(the ViT export, the CNN export and the export stage's own BYO path all gate through this)."""

from __future__ import annotations

from typing import Any

from pipeline.stage import GateCheck, GateFailed, StageResult


def gate_checks(prefix: str, parity: Any, gate: dict[str, Any]) -> list[GateCheck]:
    checks = [GateCheck.check(f"{prefix}.cosine", parity.cosine, gate["cosine"], ">=")]
    for key in ("rel_l2", "max_abs", "norm_ratio"):
        if gate.get(key) is not None:
            checks.append(GateCheck.check(f"{prefix}.{key}", getattr(parity, key), gate[key], "<="))
    return checks


def finish(metrics: dict[str, Any], checks: list[GateCheck], notes: list[str]) -> StageResult:
    result = StageResult(metrics=metrics, gates=checks, notes=notes)
    failed = [c for c in checks if not c.passed]
    if failed:
        c = failed[0]
        raise GateFailed(f"vision parity gate {c.name} = {c.value:.6g} (needs {c.op} {c.threshold:g})"
                         + (f" and {len(failed) - 1} more" if len(failed) > 1 else ""), result)
    return result
