"""hostside/text.py (pure numpy) against the models' own get_rope_index / merge / deepstack code."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import numpy as np
import pytest

from stages.lib.hostside import text as host

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")


@pytest.fixture(scope="module")
def models() -> dict[str, Any]:
    import torch

    from stages.lib.checkpoints import model_class
    from stages.lib.tiny_checkpoints import tiny_config

    torch.manual_seed(0)
    return {f: model_class(f)._from_config(tiny_config(f), dtype=torch.float32).eval() for f in FAMILIES}


def _batch(spec: host.TextSpec, family: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Two left-padded rows with an image (2x3 merged) and a 2-frame video (2x2 merged per frame)."""
    i_tok, v_tok = spec.image_token_id, spec.video_token_id
    # Qwen3-VL separates video frames by timestamp text, so each frame is its own block
    video = [v_tok] * 4 + [12] + [v_tok] * 4 if family == "qwen3_vl" else [v_tok] * 8
    rows = [[7, 8, 9] + [i_tok] * 6 + [10, 11] + video + [13], [5] + [i_tok] * 6 + video + [14, 15, 16, 17]]
    width = max(map(len, rows)) + 2
    ids = np.full((2, width), 3, dtype=np.int64)
    mask = np.zeros_like(ids)
    for b, r in enumerate(rows):
        ids[b, width - len(r):] = r
        mask[b, width - len(r):] = 1
    return ids, mask, np.array([[1, 4, 6], [1, 4, 6]]), np.array([[2, 4, 4], [2, 4, 4]])


@pytest.mark.parametrize("family", FAMILIES)
def test_rope_index_matches_model(family: str, models: dict[str, Any]) -> None:
    import torch

    model = models[family]
    spec = host.TextSpec.from_config(family, model.config)
    ids, mask, img, vid = _batch(spec, family)
    secs = np.array([0.5, 2.0])
    extra = {"second_per_grid_ts": torch.tensor(secs)} if family == "qwen2_5_vl" else {}
    ref_pos, ref_delta = model.model.get_rope_index(
        torch.tensor(ids), mm_token_type_ids=torch.tensor(host.mm_token_types(ids, spec)),
        image_grid_thw=torch.tensor(img), video_grid_thw=torch.tensor(vid), attention_mask=torch.tensor(mask), **extra)
    pos, delta = host.rope_index(spec, ids, img, vid, mask, secs)
    np.testing.assert_array_equal(pos, ref_pos.numpy())
    np.testing.assert_array_equal(delta, ref_delta.numpy())
    assert pos.dtype == np.int64 and pos.shape == (3, *ids.shape)
    # the visual block really is 3-D (rows differ), not a text run
    assert (pos[1] != pos[2]).any()


def test_qwen2_5_video_spacing_uses_second_per_grid(models: dict[str, Any]) -> None:
    spec = host.TextSpec.from_config("qwen2_5_vl", models["qwen2_5_vl"].config)
    ids, mask, img, vid = _batch(spec, "qwen2_5_vl")
    slow, _ = host.rope_index(spec, ids, img, vid, mask, np.array([2.0, 2.0]))
    fast, _ = host.rope_index(spec, ids, img, vid, mask, np.array([0.5, 0.5]))
    assert not np.array_equal(slow[0], fast[0])  # temporal row spaced by tokens_per_second * seconds
    np.testing.assert_array_equal(slow[1:], fast[1:])


@pytest.mark.parametrize("family", FAMILIES)
def test_decode_positions_match_generation_rule(family: str, models: dict[str, Any]) -> None:
    """After the prompt, the model's compute_3d_position_ids adds rope_deltas to the text position."""
    import torch
    from transformers import DynamicCache

    model = models[family]
    spec = host.TextSpec.from_config(family, model.config)
    ids, mask, img, vid = _batch(spec, family)
    _, delta = host.rope_index(spec, ids, img, vid, mask)
    full = host.extend_attention_mask(mask, 3)
    model.model.rope_deltas = torch.tensor(delta)
    cache = DynamicCache(config=model.config.text_config)
    kv = torch.zeros(2, model.config.text_config.num_key_value_heads, ids.shape[1], 16)
    for i in range(model.config.text_config.num_hidden_layers):
        cache.update(kv, kv, i)
    ref = model.model.compute_3d_position_ids(
        input_ids=None, inputs_embeds=torch.zeros(2, 3, 8), image_grid_thw=None, video_grid_thw=None,
        attention_mask=torch.tensor(full), past_key_values=cache)
    np.testing.assert_array_equal(host.decode_position_ids(full, delta, 3), ref.numpy()[:, :, -3:])


def test_rope_index_rejects_mismatched_grid(models: dict[str, Any]) -> None:
    spec = host.TextSpec.from_config("qwen2_vl", models["qwen2_vl"].config)
    ids = np.array([[1, 2] + [spec.image_token_id] * 5 + [3]])
    with pytest.raises(ValueError, match="placeholder tokens"):
        host.rope_index(spec, ids, np.array([[1, 4, 6]]))
    with pytest.raises(ValueError, match="more image blocks than grids"):
        host.rope_index(spec, ids, None)


def test_merge_image_features_matches_masked_scatter(models: dict[str, Any]) -> None:
    import torch

    spec = host.TextSpec.from_config("qwen2_vl", models["qwen2_vl"].config)
    ids, _, _, _ = _batch(spec, "qwen2_vl")
    rng = np.random.default_rng(0)
    embeds = rng.standard_normal((*ids.shape, 8)).astype(np.float32)
    feats = rng.standard_normal((12, 8)).astype(np.float32)
    mask = torch.tensor(ids == spec.image_token_id)[..., None].expand(-1, -1, 8)
    ref = torch.tensor(embeds).masked_scatter(mask, torch.tensor(feats)).numpy()
    np.testing.assert_array_equal(host.merge_image_features(embeds, ids, feats, spec.image_token_id), ref)
    with pytest.raises(ValueError, match="feature rows"):
        host.merge_image_features(embeds, ids, feats[:5], spec.image_token_id)


def test_dense_deepstack_equals_masked_add(models: dict[str, Any]) -> None:
    import torch

    model = models["qwen3_vl"]
    spec = host.TextSpec.from_config("qwen3_vl", model.config)
    assert spec.deepstack_layers == len(model.config.vision_config.deepstack_visual_indexes)
    ids, _, _, _ = _batch(spec, "qwen3_vl")
    vis = host.visual_mask(ids, spec)
    rng = np.random.default_rng(1)
    hidden = rng.standard_normal((*ids.shape, 8)).astype(np.float32)
    feats = [rng.standard_normal((int(vis.sum()), 8)).astype(np.float32)]
    ref = model.model.language_model._deepstack_process(torch.tensor(hidden), torch.tensor(vis), torch.tensor(feats[0]))
    dense = host.scatter_deepstack(ids, feats, spec)
    np.testing.assert_array_equal(hidden + dense[0], ref.numpy())
    assert all(z.shape == (2, 1, 8) and not z.any() for z in host.zeros_deepstack(spec, 2, 1, 8))


def test_text_spec_rejects_unknown_family(models: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="supported"):
        host.TextSpec.from_config("llava", models["qwen2_vl"].config)


def test_module_imports_without_torch() -> None:
    code = "import sys, stages.lib.hostside.text; assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
