"""Parity of the exported decoder + embed graphs against the PyTorch model.

Held-out cases (shapes other than the export sample): a real multimodal prompt (batch 2,
left-padded, two image sizes) through embed + merge + decoder prefill, random prefill with no
past, a chunk after a non-zero past (batch 2, distinct M-RoPE rows, Qwen3-VL deepstack on a
partial visual mask), and a single-token decode step. Then a greedy multimodal generation
through the exported pieces against ``model.generate`` (teacher-forced over a block-by-block
decoder; see :func:`run_parity`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from stages.lib.hostside import text as host
from stages.lib.hostside.generate import OrtPipeline, Prompt, token_agreement, torch_generate
from stages.lib.parity.metrics import Parity, compare, topk_agreement, worst


@dataclass
class ParityReport:
    cases: dict[str, Parity]
    top1: float  # share of positions, all cases pooled, whose FP32-reference argmax the export matches
    tokens: np.ndarray
    ref_tokens: np.ndarray
    vision_source: str  # "onnx" (export_vision graph) or "torch" (the model's own vision tower)
    errors: dict[str, str]  # cases the exported graphs could not run, with the runtime's message
    generation: str = "free-running"  # or "teacher-forced" (a block-by-block decoder: one pass)

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
            "generation": self.generation,
            "errors": self.errors,
            "cases": {k: v.as_dict() for k, v in self.cases.items()},
            "tokens": self.tokens.tolist(),
            "ref_tokens": self.ref_tokens.tolist(),
        }


def make_prompt(model: Any, image_processor: Any, image_sizes: list[tuple[int, int]], prompt_len: int, seed: int) -> Prompt:
    """A left-padded batch, one image per row (sizes differ), random text around the image."""
    from stages.lib.hostside.prompt_ids import image_prompt_ids
    from stages.lib.hostside.vision import num_image_tokens, preprocess, synthetic_image

    cfg = model.config
    rng = np.random.default_rng(seed)
    vspec = _vision_spec(model)
    special = {cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id}
    plain = [t for t in range(min(special)) if t not in special]  # ordinary vocabulary ids
    rows, pvs, grids = [], [], []
    for i, (h, w) in enumerate(image_sizes):
        pv, grid = preprocess([synthetic_image(h, w, seed + i)], vspec, image_processor)
        before = rng.choice(plain, size=max(1, prompt_len // 3 + i)).tolist()
        after = rng.choice(plain, size=max(1, prompt_len - len(before) - i)).tolist()
        rows.append(image_prompt_ids(before, after, num_image_tokens(vspec, grid)[0], cfg))
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


@dataclass
class _Case:
    """One decoder call under test: its feeds and the FP32 reference logits it must match."""

    feeds: dict[str, np.ndarray]
    ref: np.ndarray
    keep: np.ndarray | None = None  # positions that carry meaning (not left padding)
    prefix: int | None = None  # compare only the first positions (the rest are teacher-forced tokens)


def _random_case(pipe: OrtPipeline, model: Any, rng: np.random.Generator, batch: int, seq: int, past_len: int,
                 distinct_rows: bool) -> _Case:
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
    ref = _torch_decoder(model, embeds, mask, pos, past, deep_compact, vis)
    return _Case(pipe.step_feeds(embeds, mask, pos, past, deep_dense or None), ref)


FAILED = Parity(float("nan"), float("inf"), float("inf"), float("inf"), False)


def _message(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"


def _run_decoder(pipe: OrtPipeline, cases: dict[str, _Case]) -> dict[str, np.ndarray | Exception]:
    """Each case's logits (or the runtime's error). A block-by-block session runs every case in
    one segment-major pass, each block's session built once; if that pass fails, each case runs
    alone so the error lands on the case that caused it."""
    logits = [pipe.decoder.get_outputs()[0].name]
    run_many = getattr(pipe.decoder, "run_many", None)
    if run_many is not None:
        try:
            outs = run_many(logits, [c.feeds for c in cases.values()])
            return {name: o[0] for name, o in zip(cases, outs, strict=True)}
        except Exception:  # noqa: BLE001 - attributed per case below
            pass
    got: dict[str, np.ndarray | Exception] = {}
    for name, c in cases.items():  # a block-by-block session answers run() too, one call each
        try:
            got[name] = pipe.decoder.run(logits, c.feeds)[0]
        except Exception as e:  # onnxruntime raises its own Fail/InvalidArgument types
            got[name] = e
    return got


def run_parity(pipe: OrtPipeline, model: Any, image_processor: Any, *, image_sizes: list[tuple[int, int]],
               prompt_len: int, sample_seq: int, new_tokens: int, seed: int, vision_source: str,
               report: Callable[[str], None] | None = None) -> ParityReport:
    """``model`` is the FP32 reference; ``pipe`` runs the exported graphs.

    Every PyTorch reference is computed first, then the exported graphs run (so a streamed
    reference's kept blocks can go before the decoder's sessions open). The greedy generation
    runs free in the exported graphs when the decoder is one session; over a block-by-block
    decoder (``segment_session``) it is teacher-forced inside the multimodal case: the same
    argmax a greedy loop would take at each position, from one pass instead of one per token.
    A case the graph cannot even run (e.g. an export that baked the sample's shapes) counts as
    failed (NaN cosine) with the runtime's message in ``errors``, so the gate reports it.
    """
    import torch

    from stages.lib.checkpoints.streamed_model import release_blocks

    rng = np.random.default_rng(seed)
    errors: dict[str, str] = {}
    prompt = make_prompt(model, image_processor, image_sizes, prompt_len, seed)
    if vision_source == "torch":
        prompt.image_features, prompt.deepstack_features = torch_visual_features(model, prompt)
    forced = hasattr(pipe.decoder, "run_many")
    ref_prompt = Prompt(prompt.input_ids, prompt.attention_mask, prompt.pixel_values, prompt.image_grid_thw)
    say = report or (lambda msg: None)
    say(f"PyTorch reference: greedy generation of {new_tokens} tokens")
    ref_tokens = torch_generate(model, ref_prompt, new_tokens)
    say("PyTorch reference: multimodal prefill and three held-out shapes")
    with torch.no_grad():
        mm_ref = model(
            input_ids=torch.as_tensor(prompt.input_ids), attention_mask=torch.as_tensor(prompt.mask()),
            pixel_values=torch.as_tensor(prompt.pixel_values), image_grid_thw=torch.as_tensor(prompt.image_grid_thw),
            mm_token_type_ids=torch.as_tensor(host.mm_token_types(prompt.input_ids, pipe.spec)),
        ).logits.float().numpy()
    cases: dict[str, _Case] = {}
    for name, (b, s, p, distinct) in {
        f"prefill_b1_s{sample_seq + 5}": (1, sample_seq + 5, 0, False),
        "chunk_b2_s7_past11": (2, 7, 11, True),
        "decode_b2_s1_past20": (2, 1, 20, False),
    }.items():
        cases[name] = _random_case(pipe, model, rng, b, s, p, distinct)
    release_blocks(model)  # the references are made: the decoder's sessions get the memory
    mm = "multimodal_prefill_b2_padded"
    try:
        # teacher-forced: the prompt and the reference's first n - 1 greedy tokens in one prefill;
        # the argmax at the n positions from the prompt's last one is what a greedy loop fed the
        # reference's tokens would pick
        tail = ref_tokens[:, :-1] if forced and new_tokens > 1 else None
        feeds, _ = pipe.prefill_feeds(prompt, tail)
        cases = {mm: _Case(feeds, mm_ref, prompt.mask().astype(bool), mm_ref.shape[1]), **cases}
    except Exception as e:  # the vision or embed graph could not run
        errors[mm] = _message(e)
    say(f"the exported decoder on {len(cases)} cases")
    outs = _run_decoder(pipe, cases)
    results: dict[str, Parity] = {mm: FAILED} if mm in errors else {}
    tops: list[tuple[float, int]] = [(0.0, 1)] if mm in errors else []
    for name, c in cases.items():
        out = outs[name]
        if isinstance(out, Exception):
            results[name], errors[name] = FAILED, _message(out)
            tops.append((0.0, 1))
            continue
        o = out[:, : c.prefix] if c.prefix is not None else out
        o, r = (o[c.keep], c.ref[c.keep]) if c.keep is not None else (o, c.ref)
        results[name] = compare(o.astype(np.float32), r)
        n = int(np.prod(r.shape[:-1]))
        tops.append((topk_agreement(o.astype(np.float32), r) * n, n))
    tokens = np.full_like(ref_tokens, -1)
    if forced and new_tokens > 1:
        forced_out = outs.get(mm)
        if isinstance(forced_out, np.ndarray):
            s = mm_ref.shape[1]
            tokens = np.argmax(forced_out[:, s - 1: s - 1 + new_tokens], axis=-1)
    else:
        try:
            tokens = pipe.generate(prompt, new_tokens)
        except Exception as e:
            errors["generate"] = _message(e)
    top1 = sum(a for a, _ in tops) / sum(n for _, n in tops)
    return ParityReport(results, float(top1), tokens, ref_tokens, vision_source, errors,
                        "teacher-forced" if forced and new_tokens > 1 else "free-running")
