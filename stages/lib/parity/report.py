"""How the verify stage's comparisons read in the build report: the parity table (every graph x
runtime: pass / fail / not-run / ungated, with the figures the gates read) and one error plot
per drilled-down graph."""

from __future__ import annotations

from typing import Any

from pipeline.stage import ReportFigure, ReportTable

__all__ = ["DRILLDOWN", "FIGURES", "PARITY", "report_parts"]

PARITY, DRILLDOWN = "Parity against PyTorch", "Per-block error (drill-down)"
FIGURES = ("cosine", "rel_l2", "max_abs", "norm_ratio", "top1", "top1_decisive", "top5", "tokens", "tokens_decisive",
           "tokens_free", "kl")


def report_parts(target: str, rows: list[dict[str, Any]], drill: dict[str, Any]) -> list[ReportTable | ReportFigure]:
    """The parity table (every graph x runtime: pass / fail / not-run / ungated) and one error
    plot per drilled-down graph, for the build report."""
    table = ReportTable(
        PARITY, ("target", "graph", "runtime", "precision", "status", *FIGURES, "note"),
        tuple((target, r["graph"], r["runtime"], r["precision"], r["status"],
               *((r.get("figures") or {}).get(f) for f in FIGURES), r.get("reason") or "") for r in rows),
        status=tuple(r["status"] for r in rows),
        note="top1 and tokens count the decisive positions only (the reference's lead above twice the unquantized "
             "export's logit error and >= 1 % of probability; *_decisive: how many of how many); vision_effect is the reference decoder fed the "
             "quantized image features. A figure with no gate set is 'ungated': add a threshold under gates: to enforce it.")
    figures = [ReportFigure(DRILLDOWN, f"{g} on {target}: error per block vs PyTorch", f"{g}: {d['jump'].get('why')}",
                            tuple({k: b.get(k) for k in ("block", "cosine", "rel_l2", "max_abs")} for b in d["blocks"]),
                            d["jump"].get("block")) for g, d in drill.items()]
    return [table, *figures]
