"""Parity of the exported decoder + embed graphs against the PyTorch model.

Held-out cases (shapes other than the export sample): a real multimodal prompt (batch 2,
left-padded, two image sizes) through embed + merge + decoder prefill, random prefill with no
past, a chunk after a non-zero past (batch 2, distinct M-RoPE rows, Qwen3-VL deepstack on a
partial visual mask), and a single-token decode step. Then a greedy multimodal generation
through the exported pieces against ``model.generate``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from stages.lib.generate import OrtPipeline, Prompt, token_agreement, torch_generate
from stages.lib.hostside import text as host
from stages.lib.metrics import Parity, compare, topk_agreement, worst


@dataclass
class ParityReport:
    cases: dict[str, Parity]
    top1: float  # share of positions, all cases pooled, whose FP32-reference argmax the export matches
    tokens: np.ndarray
    ref_tokens: np.ndarray
    vision_source: str  # "onnx" (export_vision graph) or "torch" (the model's own vision tower)
    errors: dict[str, str]  # cases the exported graphs could not run, with the runtime's message

    def summary(self) -> dict[str, Any]:
        w = worst(list(self.cases.values()))
        return {
            "cosine": w.cosine,
            "rel_l2": w.rel_l2,
            "max_abs": w.max_abs,
            "norm_ratio": w.norm_ratio,
            "top1": self.top1,
            "token_agreement": token_agreement(self.tokens, self.ref_tokens),
            "vision_source": self.vision_source,
            "errors": self.errors,
            "cases": {k: v.as_dict() for k, v in self.cases.items()},
            "tokens": self.tokens.tolist(),
            "ref_tokens": self.ref_tokens.tolist(),
        }


def make_prompt(model: Any, image_processor: Any, image_sizes: list[tuple[int, int]], prompt_len: int, seed: int) -> Prompt:
    """A left-padded batch, one image per row (sizes differ), random text around the image."""
    from stages.lib.hostside.vision import preprocess, synthetic_image

    cfg = model.config
    rng = np.random.default_rng(seed)
    merge = int(cfg.vision_config.spatial_merge_size)
    special = {cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id}
    plain = [t for t in range(min(special)) if t not in special]  # ordinary vocabulary ids
    rows, pvs, grids = [], [], []
    for i, (h, w) in enumerate(image_sizes):
        pv, grid = preprocess([synthetic_image(h, w, seed + i)], _vision_spec(model), image_processor)
        n_img = int(np.prod(grid[0])) // merge**2
        before = rng.choice(plain, size=max(1, prompt_len // 3 + i)).tolist()
        after = rng.choice(plain, size=max(1, prompt_len - len(before) - i)).tolist()
        rows.append(before + [cfg.vision_start_token_id] + [cfg.image_token_id] * n_img + [cfg.vision_end_token_id] + after)
        pvs.append(pv)
        grids.append(grid)
    width = max(len(r) for r in rows)
    ids = np.zeros((len(rows), width), dtype=np.int64)
    mask = np.zeros_like(ids)
    for b, r in enumerate(rows):
        ids[b, width - len(r):] = r
        mask[b, width - len(r):] = 1
        ids[b, : width - len(r)] = plain[0]
    return Prompt(ids, mask, np.concatenate(pvs).astype(np.float32), np.concatenate(grids).astype(np.int64))


def _vision_spec(model: Any) -> Any:
    from stages.lib.hostside.vision import VisionSpec

    return VisionSpec.from_config(str(model.config.model_type), model.config.vision_config)


def torch_visual_features(model: Any, prompt: Prompt) -> tuple[np.ndarray, list[np.ndarray]]:
    import torch

    with torch.no_grad():
        out = model.model.get_image_features(
            torch.as_tensor(prompt.pixel_values), torch.as_tensor(prompt.image_grid_thw), return_dict=True
        )
    feats = torch.cat(list(out.pooler_output)).float().numpy()
    deep = [torch.cat(list(f)).float().numpy() for f in (getattr(out, "deepstack_features", None) or [])]
    return feats, deep


def _torch_decoder(model: Any, embeds: np.ndarray, mask: np.ndarray, pos: np.ndarray, past: list[np.ndarray],
                   deep_compact: list[np.ndarray] | None, vis_mask: np.ndarray | None) -> np.ndarray:
    """The unpatched model on the same inputs (FP32), native Cache and native deepstack path."""
    import torch
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config.text_config)
    for i in range(len(past) // 2):
        if past[2 * i].shape[2]:
            cache.update(torch.as_tensor(past[2 * i]).float(), torch.as_tensor(past[2 * i + 1]).float(), i)
    kw: dict[str, Any] = {}
    if deep_compact is not None and vis_mask is not None:
        kw = {"visual_pos_masks": torch.as_tensor(vis_mask),
              "deepstack_visual_embeds": [torch.as_tensor(d).float() for d in deep_compact]}
    with torch.no_grad():
        out = model.model.language_model(
            inputs_embeds=torch.as_tensor(embeds).float(), attention_mask=torch.as_tensor(mask),
            position_ids=torch.as_tensor(pos), past_key_values=cache, use_cache=True, **kw,
        )
        return model.lm_head(out.last_hidden_state).float().numpy()


def _random_case(pipe: OrtPipeline, model: Any, rng: np.random.Generator, batch: int, seq: int, past_len: int,
                 distinct_rows: bool) -> tuple[np.ndarray, np.ndarray]:
    h, dt = pipe.hidden, pipe.dtype
    embeds = rng.standard_normal((batch, seq, h)).astype(np.float32)
    mask = np.ones((batch, past_len + seq), dtype=np.int64)
    base = np.arange(seq)[None] + past_len
    pos = np.broadcast_to(base, (3, batch, seq)).copy()
    if distinct_rows:  # image-like positions: the t/h/w rows differ, exercising every mrope section
        pos = pos + rng.integers(0, 5, size=(3, batch, seq))
    past = [rng.standard_normal((batch, pipe.kv_heads, past_len, pipe.head_dim)).astype(np.float32)
            for _ in range(2 * pipe.n_layers)]
    deep_dense: list[np.ndarray] = []
    deep_compact = vis = None
    if pipe.spec.deepstack_layers:
        vis = rng.random((batch, seq)) < 0.5
        deep_compact = [rng.standard_normal((int(vis.sum()), h)).astype(np.float32) for _ in range(pipe.spec.deepstack_layers)]
        for d in deep_compact:
            dense = np.zeros((batch, seq, h), dtype=np.float32)
            dense[vis] = d
            deep_dense.append(dense)
    # ORT sees the inputs rounded to the graph dtype; the reference sees the same rounded values
    embeds, past = embeds.astype(dt), [p.astype(dt) for p in past]
    deep_dense = [d.astype(dt) for d in deep_dense]
    deep_compact = [d.astype(dt).astype(np.float32) for d in deep_compact] if deep_compact else None
    out, _ = pipe.step(embeds, mask, pos, past, deep_dense or None)
    ref = _torch_decoder(model, embeds, mask, pos, past, deep_compact, vis)
    return out, ref


FAILED = Parity(float("nan"), float("inf"), float("inf"), float("inf"), False)


def run_parity(pipe: OrtPipeline, model: Any, image_processor: Any, *, image_sizes: list[tuple[int, int]],
               prompt_len: int, sample_seq: int, new_tokens: int, seed: int, vision_source: str) -> ParityReport:
    """``model`` is the FP32 reference; ``pipe`` runs the exported graphs.

    A case the graph cannot even run (e.g. an export that baked the sample's shapes) counts as
    failed (NaN cosine) with the runtime's message in ``errors``, so the gate reports it.
    """
    import torch

    rng = np.random.default_rng(seed)
    cases: dict[str, Parity] = {}
    tops: list[tuple[float, int]] = []  # (positions agreeing, positions) per case: pooled top-1
    errors: dict[str, str] = {}

    def run_case(name: str, fn: Any) -> None:
        try:
            out, ref, keep = fn()
        except Exception as e:  # onnxruntime raises its own Fail/InvalidArgument types
            cases[name], errors[name] = FAILED, f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
            tops.append((0.0, 1))
            return
        o, r = (out[keep], ref[keep]) if keep is not None else (out, ref)
        cases[name] = compare(o.astype(np.float32), r)
        n = int(np.prod(r.shape[:-1]))
        tops.append((topk_agreement(o.astype(np.float32), r) * n, n))

    prompt = make_prompt(model, image_processor, image_sizes, prompt_len, seed)
    if vision_source == "torch":
        prompt.image_features, prompt.deepstack_features = torch_visual_features(model, prompt)

    def multimodal() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        embeds, deep = pipe.prompt_embeds(prompt)
        pos, _ = host.rope_index(pipe.spec, prompt.input_ids, prompt.image_grid_thw, None, prompt.mask())
        out, _ = pipe.step(embeds, prompt.mask(), pos, pipe.empty_past(embeds.shape[0]), deep)
        with torch.no_grad():
            ref = model(
                input_ids=torch.as_tensor(prompt.input_ids), attention_mask=torch.as_tensor(prompt.mask()),
                pixel_values=torch.as_tensor(prompt.pixel_values), image_grid_thw=torch.as_tensor(prompt.image_grid_thw),
                mm_token_type_ids=torch.as_tensor(host.mm_token_types(prompt.input_ids, pipe.spec)),
            ).logits.float().numpy()
        return out, ref, prompt.mask().astype(bool)  # padded positions carry no meaning

    run_case("multimodal_prefill_b2_padded", multimodal)
    for name, (b, s, p, distinct) in {
        f"prefill_b1_s{sample_seq + 5}": (1, sample_seq + 5, 0, False),
        "chunk_b2_s7_past11": (2, 7, 11, True),
        "decode_b2_s1_past20": (2, 1, 20, False),
    }.items():
        run_case(name, lambda b=b, s=s, p=p, d=distinct: (*_random_case(pipe, model, rng, b, s, p, d), None))
    ref_prompt = Prompt(prompt.input_ids, prompt.attention_mask, prompt.pixel_values, prompt.image_grid_thw)
    ref_tokens = torch_generate(model, ref_prompt, new_tokens)
    try:
        tokens = pipe.generate(prompt, new_tokens)
    except Exception as e:
        errors["generate"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
        tokens = np.full_like(ref_tokens, -1)
    top1 = sum(a for a, _ in tops) / sum(n for _, n in tops)
    return ParityReport(cases, float(top1), tokens, ref_tokens, vision_source, errors)
