"""Held-out inputs and parity for quantized graphs: the `reference` stage's set, never calibration.

Feeds come from `reference.npz` (the same tensors PyTorch saw), so a quantized graph is scored
both against the unquantized graph (the error quantization adds) and against PyTorch (what a
user gets), with the metrics the export stage uses.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from stages.lib.parity.metrics import Agreement, compare, decisive_top1, topk_agreement, worst


def vision_feeds(samples: Sequence[Mapping[str, np.ndarray]], vspec: Any) -> list[dict[str, np.ndarray]]:
    from stages.lib.hostside.vision import vision_inputs

    return [vision_inputs(vspec, s["pixel_values"], s["image_grid_thw"]) for s in samples]


def decoder_feeds(samples: Sequence[Mapping[str, np.ndarray]], inputs: Sequence[Any], tspec: Any) -> list[dict[str, np.ndarray]]:
    """Prefill feeds with the reference's merged `inputs_embeds` and zero-length past, in the
    types `inputs` (the graph's) declare; deepstack maps zero where the sample has none."""
    from stages.lib.hostside.text import prefill_feeds, visual_mask

    out = []
    for s in samples:
        maps = [s[f"deepstack.{k}"] for k in range(tspec.deepstack_layers) if f"deepstack.{k}" in s]
        out.append(prefill_feeds(inputs, s["inputs_embeds"], s["attention_mask"], s["position_ids"], maps,
                                 visual_mask(s["input_ids"], tspec)))
    return out


def torch_refs(graph: str, samples: Sequence[Mapping[str, np.ndarray]], output: str) -> list[dict[str, np.ndarray]] | None:
    key = "vision_features" if graph == "vision" else "logits"
    if not all(key in s for s in samples):
        return None
    return [{output: s[key]} for s in samples]


def parity(outs: Sequence[Mapping[str, np.ndarray]], refs: Sequence[Mapping[str, np.ndarray]], output: str,
           logits: bool, noise: float = 0.0, floors: Sequence[Any] | None = None,
           gate: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Worst-case parity of `output` over the samples (+ for logits: ``top1``, the next-token
    agreement at the decisive positions, pooled; ``top1_all`` at every position, worst sample).
    With per-sample noise ``floors`` and a ``gate``: each sample graded at its floor (``parity.noise_floor``)."""
    from stages.lib.parity.noise_floor import graded

    pars = []
    for o, r in zip(outs, refs, strict=True):
        a, b = np.asarray(o[output], np.float32), np.asarray(r[output], np.float32)
        pars.append(compare(a.reshape(b.shape) if a.size == b.size else a, b))
    use_floors = floors is not None and gate is not None and any(f is not None for f in floors)
    d: dict[str, Any] = graded([[p] for p in pars], list(floors), gate) if use_floors else worst(pars).as_dict()  # type: ignore[arg-type]
    if logits:
        pairs = [(np.asarray(o[output], np.float32), np.asarray(r[output], np.float32)) for o, r in zip(outs, refs, strict=True)]
        agreed = sum((decisive_top1(a, b, noise) for a, b in pairs), Agreement(0, 0, 0))
        if agreed.agreement is not None:
            d["top1"] = agreed.agreement
        d["top1_decisive"] = f"{agreed.decisive}/{agreed.positions}"
        d["top1_all"] = float(min(topk_agreement(a, b) for a, b in pairs))
    d["samples"] = len(pars)
    return d


def run_all(model: Any, feeds: Sequence[Mapping[str, np.ndarray]], outputs: Sequence[str],
            folder: Path | None = None) -> list[dict[str, np.ndarray]]:
    """``outputs`` (as float32) of a graph on every feed, through the block runner
    (``segments.run_segmented``: segment by segment at the model's recorded cuts, whole when it
    has none; ORT optimizations off), so a decoder bigger than memory runs too.

    ``model``: a path, run from its file; or an ir.Model / ModelProto, first written to a
    temporary folder (in ``folder``) and run from there, so references and candidates always
    go through the same runner. That matters: ORT CPU removes FP16 casts inside one session,
    and a cut rounds the carried residual stream to FP16, so a segmented run differs slightly
    (decoder logits ~4e-3) from a whole-graph session; compare runs of one runner only."""
    from stages.lib.qdq.calibset import cast_feed
    from stages.lib.segments import runner as segments

    if not isinstance(model, (str, Path)):
        from stages.lib.qdq.graphio import spilled

        with spilled(model, folder) as path:
            return run_all(path, feeds, outputs)
    path = Path(model)
    specs = segments.graph_inputs(path)
    got: list[dict[str, np.ndarray]] = [{} for _ in feeds]
    segments.run_segmented(path, [cast_feed(specs, f) for f in feeds], lambda seg, i, v: got[i].update(v),
                           expose=list(outputs))
    return [{k: np.asarray(g[k], np.float32) for k in outputs} for g in got]


def load_feeds(path: Path) -> list[dict[str, np.ndarray]]:
    """Feeds saved as s{i}.<input> (calibrate's feeds_<graph>.npz); [] when absent."""
    if not path.is_file():
        return []
    with np.load(path, allow_pickle=False) as z:
        out: dict[int, dict[str, np.ndarray]] = {}
        for key in z.files:
            idx, name = key.split(".", 1)
            out.setdefault(int(idx[1:]), {})[name] = z[key]
    return [out[i] for i in sorted(out)]


def noise_floors(path: Path, feeds: Sequence[Mapping[str, np.ndarray]], refs: Sequence[Mapping[str, np.ndarray]],
                 output: str, preprocess: Mapping[str, Any]) -> list[np.ndarray] | None:
    """The graph's noise floor on each feed (``parity.noise_floor``): its ``output`` on the input
    moved by ±½ grey level against ``refs``; None without a declared std."""
    from stages.lib.parity.noise_floor import floor_of, perturbed

    name = preprocess.get("input_name")
    if "std" not in preprocess or not name:
        return None
    noisy = [{**f, name: perturbed(f[name], preprocess["std"], preprocess.get("layout", "NCHW"), i)}
             for i, f in enumerate(feeds)]
    outs = run_all(path, noisy, [output])
    return [floor_of(o[output], r[output]) for o, r in zip(outs, refs, strict=True)]
