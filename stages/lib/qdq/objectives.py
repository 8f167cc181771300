"""What the mixed-precision search aims at besides the cosine: the tokens the model would pick.

A graph can meet a cosine budget and still change the greedy token at positions where the
reference was sure (decisive: its lead above twice the unquantized export's logit error,
``parity.metrics.decisive``). The fallback walk (``sensitivity.run``) scores one number per
candidate; ``sensitivity.Evaluator`` folds the decisive next-token agreement into it where a
``TokenObjective`` is given. For the decoder that is its own logits on the calibration prompts;
for the vision graph it is the *unquantized* decoder fed the candidate's image features (the
calibration prompts' embeddings with the image rows replaced): the vision graph is searched for
its effect on what the decoder says, as the verify stage grades it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["TokenObjective", "decisive_or_none", "decoder_objective", "for_graph", "vision_objective"]

Outputs = Sequence[Mapping[str, np.ndarray]]


@dataclass(frozen=True)
class TokenObjective:
    """``logits(outs)``: a candidate's outputs as logits per sample, compared at the decisive
    positions with ``reference`` (the unquantized chain's, per sample) from ``starts[i]`` on (the
    first image token for the vision graph: nothing before it can change). ``target``: the
    agreement the search must reach."""

    logits: Callable[[Outputs], list[np.ndarray]]
    reference: Sequence[np.ndarray]
    noise: float
    target: float
    starts: Sequence[int] = ()
    inputs: str = "the graph's own logits"  # for the report: what was compared

    def agreement(self, outs: Outputs) -> float | None:
        from stages.lib.parity.metrics import Agreement, decisive_top1

        total = Agreement(0, 0, 0)
        for i, (got, ref) in enumerate(zip(self.logits(outs), self.reference, strict=True)):
            k = self.starts[i] if self.starts else 0
            total += decisive_top1(got.reshape(ref.shape)[..., k:, :], ref[..., k:, :], self.noise)
        return total.agreement


def decoder_objective(refs: Outputs, noise: float, target: float) -> TokenObjective:
    return TokenObjective(lambda outs: [np.asarray(o["logits"]) for o in outs], [np.asarray(r["logits"]) for r in refs],
                          noise, target)


def _merged(feed: Mapping[str, np.ndarray], image: np.ndarray, out: Mapping[str, np.ndarray],
            feature: str) -> dict[str, np.ndarray]:
    """A decoder prefill feed with the image rows (and Qwen3-VL deepstack rows) from ``out``."""
    merged = dict(feed)
    emb = np.array(feed["inputs_embeds"])
    emb[0, image] = np.asarray(out[feature]).reshape(-1, emb.shape[-1]).astype(emb.dtype)
    merged["inputs_embeds"] = emb
    stacked = next((v for k, v in out.items() if k.startswith("deepstack")), None)
    if stacked is not None:
        for k, layer in enumerate(np.asarray(stacked)):
            name = f"deepstack_embeds.{k}"
            if name in feed:
                d = np.array(feed[name])
                d[0, image] = layer.reshape(-1, d.shape[-1]).astype(d.dtype)
                merged[name] = d
    return merged


def vision_objective(decoder: Path, decoder_feeds: Sequence[Mapping[str, np.ndarray]], image_token_id: int,
                     feature: str, noise: float, target: float) -> TokenObjective:
    """The unquantized decoder (``decoder``, the fuse stage's) on the calibration prompts
    (``decoder_feeds``, with their ``input_ids``, paired with the vision search feeds by index),
    fed a candidate's image features."""
    from stages.lib.qdq.heldout import run_all

    feeds = [{k: v for k, v in f.items() if k != "input_ids"} for f in decoder_feeds]
    images = [np.asarray(f["input_ids"])[0] == image_token_id for f in decoder_feeds]
    starts = [int(np.argmax(m)) for m in images]

    def logits(outs: Outputs) -> list[np.ndarray]:
        merged = [_merged(f, m, o, feature) for f, m, o in zip(feeds, images, outs, strict=True)]
        return [r["logits"] for r in run_all(decoder, merged, ["logits"])]

    reference = [r["logits"] for r in run_all(decoder, feeds, ["logits"])]
    return TokenObjective(logits, reference, noise, target, starts, inputs="the unquantized decoder's logits")


def for_graph(graph: str, gate: Mapping[str, object], fused: Path, calibrate: Path, calibration_samples: int,
              feature: str, search_refs: Outputs) -> TokenObjective | None:
    """The quantize stage's objective for ``graph``, where the gate sets ``top1``: the decoder's
    own logits; the vision graph's effect on the unquantized decoder (the fuse stage's), where the
    model has one and calibration kept ``calibration_samples`` paired prompts (0: the search runs
    on held-out feeds, which have none). None otherwise (a vision-only model serves its features)."""
    import json

    from stages.lib.parity.metrics import export_noise
    from stages.lib.qdq import heldout, sensitivity

    target = sensitivity.token_target(dict(gate))
    if target is None:
        return None
    noise = export_noise(fused)
    if graph == "decoder":
        return decisive_or_none(decoder_objective(search_refs, noise, target))
    dfeeds = heldout.load_feeds(calibrate / "feeds_decoder.npz")
    if not (fused / "decoder.onnx").is_file() or not (fused / "decoder.json").is_file() or not calibration_samples \
            or len(dfeeds) != calibration_samples or not all("input_ids" in f for f in dfeeds):
        return None
    token = int(json.loads((fused / "decoder.json").read_text())["host"]["image_token_id"])
    return decisive_or_none(vision_objective(fused / "decoder.onnx", dfeeds, token, feature, noise, target))


def decisive_or_none(objective: TokenObjective) -> TokenObjective | None:
    """None where no reference position is decisive (a flat random model): every candidate's
    agreement would be None, so the objective could only cost a run per candidate (for the vision
    graph a whole decoder pass)."""
    from stages.lib.parity.metrics import decisive, margins

    for i, ref in enumerate(objective.reference):
        k = objective.starts[i] if objective.starts else 0
        if decisive(margins(np.asarray(ref)[..., k:, :]), objective.noise).any():
            return objective
    return None
