"""The vision graph graded by what the decoder makes of it.

A feature cosine of 0.999 says little about what the model then says: a decoder can turn a
small, structured feature error into another first token (measured on the default tiny model:
INT8 vision features at cosine 0.9997 moved the reference decoder's logits by up to 0.56 and
flipped decisive tokens). So the verify stage feeds the *reference* decoder (the checkpoint's
PyTorch language model, streamed block by block, FP32) the quantized graph's image features in
place of PyTorch's and compares its logits with the reference features' own, batched in one
forward per sample so a streamed 8 B decoder reads its blocks once:

- ``top1``: greedy-token agreement at the decisive positions from the first image token on
  (``metrics.decisive``; positions before the image cannot change, causal attention);
- ``tokens``: the reference's generated tokens (teacher-forced: fed back after the prompt), the
  decisive ones kept up to the first decisive change (``metrics.until_first_change``): a
  changed first token scores 0; ``first_token``: over each sample's first generated token;
- ``kl``: the mean KL(reference || with quantized features) over those positions, ``kl_max``.

Only the image features differ between the two rows of the batch: the figures isolate the vision
graph's effect on generation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from stages.lib.parity.graphs import Measured, agreement_figures, deepstack_maps
from stages.lib.parity.metrics import (
    Agreement,
    decisive_agreement,
    kl_divergence,
    margins,
    until_first_change,
)

__all__ = ["EFFECT_FIGURES", "measure_vision_effect"]

EFFECT_FIGURES = ("top1", "tokens", "kl")  # what a gate may set for this row


def _batch(model: Any, specs: Any, s: dict[str, np.ndarray], variants: Sequence[tuple[np.ndarray, list[np.ndarray]]],
           n: int) -> np.ndarray:
    """Logits [len(variants), S + n - 1, V] of the reference decoder on the sample's prompt with
    each variant's (image features, deepstack maps), the first n - 1 generated tokens after it."""
    import torch

    from stages.lib.hostside import text as host

    ids = s["input_ids"]
    image = ids[0] == specs.text.image_token_id
    tail = model.model.get_input_embeddings()(torch.from_numpy(s["generated"][None, : n - 1].astype(np.int64)))
    tail_np = tail.detach().float().numpy()
    embeds, masks, poses = [], [], []
    for feats, _ in variants:
        emb = s["inputs_embeds"].copy()
        emb[0, image] = feats.reshape(-1, emb.shape[-1])
        e, m, p, _ = host.teacher_forced(emb, s["attention_mask"], s["position_ids"], s["rope_deltas"], tail_np)
        embeds.append(e)
        masks.append(m)
        poses.append(p)
    kw: dict[str, Any] = {"inputs_embeds": torch.from_numpy(np.concatenate(embeds)),
                          "attention_mask": torch.from_numpy(np.concatenate(masks)),
                          "position_ids": torch.from_numpy(np.concatenate(poses, axis=1)), "use_cache": False}
    if specs.text.deepstack_layers:  # Qwen3-VL: the maps are added at the visual positions, batch-major
        visual = np.concatenate([image, np.zeros(n - 1, bool)])[None].repeat(len(variants), 0)
        kw |= {"visual_pos_masks": torch.from_numpy(visual),
               "deepstack_visual_embeds": [torch.from_numpy(np.concatenate([v[1][k] for v in variants]))
                                           for k in range(specs.text.deepstack_layers)]}
    with torch.no_grad():
        hidden = model.model.language_model(**kw).last_hidden_state
        return np.asarray(model.lm_head(hidden).float().numpy())


def measure_vision_effect(model: Any, specs: Any, samples: list[dict[str, np.ndarray]],
                          outputs: list[dict[str, np.ndarray]], noise: float, n: int) -> Measured:
    """``outputs``: the quantized vision graph's outputs per sample; ``noise``: the unquantized
    export's logit error (``metrics.export_noise``); ``n``: generated tokens to teacher-force."""
    n = max(1, min([n, *(len(s["generated"]) for s in samples)]))
    top1, tokens, first = Agreement(0, 0, 0), Agreement(0, 0, 0), Agreement(0, 0, 0)
    kls: list[np.ndarray] = []
    per: list[dict[str, Any]] = []
    for s, o in zip(samples, outputs, strict=True):
        name = "image_features" if "image_features" in o else next(iter(o))
        quant = o[name].reshape(s["vision_features"].shape)
        k = specs.text.deepstack_layers
        ref_deep = [s[f"deepstack.{j}"] for j in range(k)]
        q_deep = [d.reshape(r.shape) for d, r in zip(deepstack_maps(o), ref_deep, strict=True)]
        logits = _batch(model, specs, s, [(s["vision_features"], ref_deep), (quant, q_deep)], n)
        seq = int(s["input_ids"].shape[1])
        start = int(np.argmax(s["input_ids"][0] == specs.text.image_token_id))
        ref, got = logits[0, start:], logits[1, start:]
        lead = margins(ref)
        a = decisive_agreement(got.argmax(-1), ref.argmax(-1), lead, noise)
        gen = slice(seq - 1 - start, seq - 1 - start + n)
        # what the user reads: the generated text up to its first decisive change (after it the
        # text differs whatever the later positions say), so an early change fails, a late one not
        t = until_first_change(got[gen].argmax(-1), ref[gen].argmax(-1), lead[gen], noise)
        f = decisive_agreement(got[gen][:1].argmax(-1), ref[gen][:1].argmax(-1), lead[gen][:1], noise)
        kl = kl_divergence(got, ref)
        top1, tokens, first, kls = top1 + a, tokens + t, first + f, [*kls, kl]
        per.append({"top1": a.agreement, "tokens": t.agreement, "first_token_same": bool(f.agreed == f.positions),
                    "first_token_leads": [float(x) for x in lead[gen][0]], "kl": float(kl.mean()), "kl_max": float(kl.max()),
                    "tokens_with_quantized_features": got[gen].argmax(-1).tolist()})
    every = np.concatenate(kls)
    figures = {**agreement_figures("top1", top1), **agreement_figures("tokens", tokens),
               **agreement_figures("first_token", first), "kl": float(every.mean()), "kl_max": float(every.max()),
               "noise": float(noise)}
    return Measured(figures, per)
