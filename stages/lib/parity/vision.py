"""The parity half of the ``export_vision`` stage: ``vision.onnx`` in onnxruntime (CPU) against the
*unpatched* FP32 PyTorch encoder on the verify image sizes (not the export sample's), one at a
time and all at once; the worst figures gated; ``vision.json`` written with the io spec and them.

A BF16 export runs its parity through ``stages.lib.export.bf16_widen`` (onnxruntime's CPU provider has
no BF16 kernels).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.stage import StageContext, StageResult
from pipeline.worker import peak_rss_mb
from stages.lib.export.vision import images_at, io_spec
from stages.lib.parity.metrics import Parity, compare, export_gate, gate_checks, worst


def run_parity(onnx_path: Path, reference: Any, spec: Any, image_proc: Any, params: dict[str, Any],
               family: str) -> tuple[Parity, list[dict[str, Any]]]:
    """ORT vs the unpatched FP32 torch encoder on each verify size alone, then all at once.

    ``reference`` is a zero-argument loader: every torch output is computed first and the FP32
    encoder released before the ORT session opens, so the two never hold weights at once
    (measured on Qwen3-VL-8B's 1.15 GB encoder: 6.55 GB peak with both alive)."""
    import numpy as np
    import torch

    from stages.lib.hostside import vision as hv
    from stages.lib.ortsession import ort_session

    sizes = params["verify_sizes"]
    cases = [[s] for s in sizes] + ([sizes[: params["profile"]["max_images"]]] if len(sizes) > 1 else [])
    inputs, expected = [], []
    model = reference()
    for i, case in enumerate(cases):
        pvals, grid = images_at(case, spec, image_proc, params["seed"] + 10 * i)
        inputs.append((hv.vision_inputs(spec, pvals, grid), grid))
        with torch.no_grad():
            ref = model(torch.from_numpy(pvals), grid_thw=torch.from_numpy(grid))
        refs = [ref.pooler_output.float().numpy()]
        if family == "qwen3_vl":
            refs.append(torch.stack(list(ref.deepstack_features)).float().numpy())
        expected.append(refs)
    del model, ref
    if params["dtype"] == "bf16":
        import tempfile

        from stages.lib.export.bf16_widen import bf16_as_fp32

        with tempfile.TemporaryDirectory() as tmp:  # never beside the outputs: not an artefact
            sess = ort_session(bf16_as_fp32(onnx_path, Path(tmp) / "vision_fp32.onnx"))
    else:
        sess = ort_session(onnx_path)
    rows, pars = [], []
    for (feeds, grid), refs in zip(inputs, expected, strict=True):
        try:
            outs = sess.run(None, {n: feeds[n] for n in hv.input_names(spec)})
            got = [compare(np.asarray(o, np.float32), r) for o, r in zip(outs, refs, strict=True)]
        except Exception as e:  # noqa: BLE001 - a graph with a baked shape fails here: a gate miss
            bad = Parity(float("nan"), float("inf"), float("inf"), float("inf"), False)
            got = [bad]
            rows.append({"grid_thw": grid.tolist(), "error": str(e).splitlines()[0][:300]})
        else:
            rows.append({"grid_thw": grid.tolist(), **{f"{n}": g.as_dict() for n, g in
                                                       zip(("image_features", "deepstack_features"), got, strict=False)}})
        pars.extend(got)
    return worst(pars), rows


def verify(ctx: StageContext, path: Path, family: str, f: dict[str, Any]) -> StageResult:
    """Parity of the graph ``vision_export.export`` wrote (its facts ``f``) and ``vision.json``; the
    gates go back in the result (a miss fails the node in the worker)."""
    import torch

    from stages.lib.checkpoints import local as ck

    p = ctx.params
    ctx.report("parity in onnxruntime", 0.6)

    def reference() -> Any:  # FP32 reference even for FP16 exports
        return ck.load_vision(path, family, torch.float32, trust_remote_code=bool(p.get("trust_remote_code", False)))

    parity, rows = run_parity(ctx.out / "vision.onnx", reference, f["spec"], f["image_proc"], p, family)
    gate = export_gate(p["dtype"], p["gate"], p["gate_fp16"])
    how = "onnxruntime CPU" + (" (bf16 widened to fp32: no bf16 kernels)" if p["dtype"] == "bf16" else "")
    spec_json = io_spec(f["spec"], family, p["dtype"], p, f["out_dim"])
    spec_json.update({"exporter": f["exporter"], "blocks": f["blocks"], "fp32_islands": f["islands"],
                      "sample_grid_thw": f["grid"].tolist(),
                      "parity": {"reference": "pytorch fp32 (unpatched)", "runtime": how, "worst": parity.as_dict(),
                                 "gate": gate, "cases": rows}})
    (ctx.out / "vision.json").write_text(json.dumps(spec_json, indent=2))
    metrics = {"cosine": parity.cosine, "max_abs": parity.max_abs, "rel_l2": parity.rel_l2,
               "norm_ratio": parity.norm_ratio, "export_seconds": round(f["export_seconds"], 3),
               "onnx_bytes": f["onnx_bytes"], "weight_bytes": f["weight_bytes"], "export_peak_rss_bytes": f["export_rss"],
               "peak_rss_bytes": round(peak_rss_mb() * 2**20), "exporter": f["exporter"], "vision_blocks": f["blocks"],
               "dtype": p["dtype"], "family": family}
    notes = [f"vision exported with {f['exporter']}, blocks: {f['blocks']}, FP32 islands: {len(f['islands'])}",
             *f["notes"]]
    return StageResult(metrics=metrics, gates=gate_checks("vision", parity, gate), notes=notes)
