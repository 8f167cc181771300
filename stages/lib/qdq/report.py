"""What quantize.json and the build report say stayed in high precision, and why: the layers
the placement rules or ``keep_high_precision`` kept, and the groups the mixed-precision walk
fell back (``sensitivity``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pipeline.stage import ReportTable

if TYPE_CHECKING:
    from stages.lib.qdq.placement import Placement
    from stages.lib.qdq.sensitivity import SensitivityReport

__all__ = ["KEPT", "kept_layers", "kept_table"]

KEPT = "Layers kept in high precision"  # the build report's section


def kept_layers(placement: Placement, sens: SensitivityReport) -> list[dict[str, Any]]:
    scopes = placement.scopes
    kept = [{"node": k["node"], "module": scopes.get(k["node"], ""), "why": k["why"]}
            for k in placement.kept if "sensitivity" not in k["why"]]
    return kept + [{"group": k["group"], "nodes": k["nodes"], "why": k["why"]} for k in sens.kept]


def kept_table(report: dict[str, Any], graphs: tuple[str, ...]) -> ReportTable:
    """Per graph, every layer the rules or the mixed-precision walk kept high precision, and why."""
    rows = [(g, report[g].get("precision"), k.get("node") or k.get("group") or "?", k.get("why", ""))
            for g in graphs for k in report[g].get("kept_high_precision") or [{"node": "none"}]]
    kv = (report.get("decoder") or {}).get("kv_cache")
    if kv:  # the cache is not a layer, but it is what a precision choice keeps or not: same table
        rows.append(("decoder KV cache", kv["precision"], f"{kv['mib_per_4k_tokens']} MiB per 4k tokens",
                     f"{kv['bytes_per_token']} bytes/token over {kv['layers']} layers"
                     + (f", {kv['saving_vs_fp16']:.0%} less than fp16" if kv["saving_vs_fp16"] > 0 else "")))
    return ReportTable(KEPT, ("graph", "precision", "kept high-precision", "why"), tuple(rows))
