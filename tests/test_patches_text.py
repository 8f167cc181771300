"""Fails loudly when a transformers upgrade changes what the decoder export patches or relies on."""

from __future__ import annotations

import importlib
import inspect
from typing import Any

import pytest

from stages.lib.patches import text as pt

FAMILIES = tuple(pt.MODELING_MODULES)


@pytest.fixture(scope="module")
def models() -> dict[str, Any]:
    import torch

    from stages.lib.checkpoints.local import model_class
    from stages.lib.checkpoints.tiny import tiny_config

    torch.manual_seed(0)
    out = {}
    for f in FAMILIES:
        m = model_class(f)._from_config(tiny_config(f), dtype=torch.float32).eval()
        m.config.text_config._attn_implementation = "eager"
        out[f] = m
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_patched_targets_exist(family: str) -> None:
    mod = importlib.import_module(pt.MODELING_MODULES[family])
    for attr, why in pt.PATCHED_TARGETS:
        assert hasattr(mod, attr), f"{mod.__name__}.{attr} is gone ({why})"
    text_model = getattr(mod, pt.TEXT_MODEL_CLASSES[family])
    params = inspect.signature(text_model.forward).parameters
    for name in ("inputs_embeds", "attention_mask", "position_ids", "past_key_values"):
        assert name in params, f"{text_model.__name__}.forward lost {name}"
    if family == "qwen3_vl":
        assert {"visual_pos_masks", "deepstack_visual_embeds"} <= set(params)
        assert "_deepstack_process" in vars(text_model)
    # The attention must still reach the rotary through the module global we patch and update
    # the cache through Cache.update (the only cache call FlatKVCache implements).
    attn_src = inspect.getsource(next(c for n, c in vars(mod).items() if n.endswith("Attention")
                                      and "Vision" not in n and isinstance(c, type)).forward)
    assert "apply_rotary_pos_emb(" in attn_src and "past_key_values.update(" in attn_src


def test_four_d_mask_passes_through_create_causal_mask(models: dict[str, Any]) -> None:
    import torch
    from transformers.masking_utils import create_causal_mask

    cfg = models["qwen2_vl"].config.text_config
    mask = torch.randn(2, 1, 3, 5)
    out = create_causal_mask(config=cfg, inputs_embeds=torch.zeros(2, 3, 64), attention_mask=mask,
                             past_key_values=None, position_ids=None)
    assert out is mask, "transformers no longer passes a prepared 4-D mask through unchanged"


@pytest.mark.parametrize("family", FAMILIES)
def test_patched_text_model_equals_eager(family: str, models: dict[str, Any]) -> None:
    """Under the patches (FP32: rotary/softmax changes are no-ops) the text model computes what
    the eager model computes, with FlatKVCache standing in for DynamicCache."""
    import torch
    from transformers import DynamicCache

    model = models[family]
    tm = model.model.language_model
    cfg = model.config.text_config
    g = torch.Generator().manual_seed(0)
    b, s, past = 2, 4, 3
    kvh, hd = cfg.num_key_value_heads, getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    x = torch.randn(b, s, cfg.hidden_size, generator=g)
    pos = torch.randint(0, 20, (3, b, s), generator=g)
    pkv = [(torch.randn(b, kvh, past, hd, generator=g), torch.randn(b, kvh, past, hd, generator=g))
           for _ in range(cfg.num_hidden_layers)]
    mask2d = torch.ones(b, past + s, dtype=torch.long)
    ref_cache = DynamicCache(config=cfg)
    for i, (k, v) in enumerate(pkv):
        ref_cache.update(k, v, i)
    kw: dict[str, Any] = {}
    dense: list[Any] = []
    if family == "qwen3_vl":
        vis = torch.tensor([[True, False, True, True], [False, True, False, False]])
        compact = [torch.randn(int(vis.sum()), cfg.hidden_size, generator=g)]
        kw = {"visual_pos_masks": vis, "deepstack_visual_embeds": compact}
        d = torch.zeros(b, s, cfg.hidden_size)
        d[vis] = compact[0]
        dense = [d]
    with torch.no_grad():
        ref = tm(inputs_embeds=x, attention_mask=mask2d, position_ids=pos, past_key_values=ref_cache, **kw)
        q = torch.arange(s) + past
        allowed = torch.arange(past + s)[None] <= q[:, None]
        mask4d = torch.where(allowed, 0.0, torch.finfo(torch.float32).min)[None, None].expand(b, 1, s, past + s)
        cache = pt.FlatKVCache(pkv)
        with pt.decoder_export_patches(family, tm):
            assert tm.config._attn_implementation == pt.ATTN_NAME
            extra = {"deepstack_visual_embeds": dense, "visual_pos_masks": None} if dense else {}
            out = tm(inputs_embeds=x, attention_mask=mask4d, position_ids=pos, past_key_values=cache, **extra)
    torch.testing.assert_close(out.last_hidden_state, ref.last_hidden_state, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cache.present[0][0], ref_cache.layers[0].keys)
    # everything is restored on exit
    assert tm.config._attn_implementation == "eager"
    assert "forward" not in vars(tm.rotary_emb)
    mod = importlib.import_module(pt.MODELING_MODULES[family])
    assert mod.apply_rotary_pos_emb.__name__ == "apply_rotary_pos_emb" and mod.apply_rotary_pos_emb.__module__ == mod.__name__


def test_fp16_patches_keep_rotary_and_softmax_fp32(models: dict[str, Any]) -> None:
    """In FP16 the patched rotary is closer to the FP32 truth than the model's own FP16 rotary."""
    import copy

    import torch

    mod = importlib.import_module(pt.MODELING_MODULES["qwen2_vl"])
    q = torch.randn(1, 2, 5, 16) * 30
    pos = torch.full((3, 1, 5), 3000)
    tm = copy.deepcopy(models["qwen2_vl"].model.language_model)
    cos32, sin32 = tm.rotary_emb(q, pos)
    truth = mod.apply_rotary_pos_emb(q, q, cos32, sin32)[0]
    cos16, sin16 = tm.rotary_emb(q.half(), pos)
    plain = mod.apply_rotary_pos_emb(q.half(), q.half(), cos16, sin16)[0].float()
    with pt.decoder_export_patches("qwen2_vl", tm):
        c, s = tm.rotary_emb(q.half(), pos)
        assert c.dtype == torch.float32
        patched = mod.apply_rotary_pos_emb(q.half(), q.half(), c, s)[0]
    assert patched.dtype == torch.float16
    assert (patched.float() - truth).abs().max() < (plain - truth).abs().max()
    # fully masked rows stay finite with the FP32 mask/softmax (FP16 -inf rows would be NaN)
    k = torch.randn(1, 2, 4, 16).half()
    mask = torch.full((1, 1, 5, 4), torch.finfo(torch.float32).min)
    attn = type("A", (), {"num_key_value_groups": 1})()
    out, _ = pt.export_attention(attn, q.half(), k, k, mask, scaling=0.25)
    assert torch.isfinite(out).all()


def test_unknown_family_is_refused(models: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="supported"):
        with pt.decoder_export_patches("llava", models["qwen2_vl"].model.language_model):
            pass
