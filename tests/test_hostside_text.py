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

    from stages.lib.checkpoints.local import model_class
    from stages.lib.checkpoints.tiny import tiny_config

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
    code = ("import sys, stages.lib.hostside.text, stages.lib.hostside.prompt_ids; "
            "assert not {'torch', 'transformers', 'onnx'} & set(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True)


def _inputs(dtype: str, layers: int = 2, deepstack: int = 0, extra: tuple[str, ...] = ()) -> list[Any]:
    """A decoder graph's declared inputs as a session lists them (name, ORT type, shape)."""
    from types import SimpleNamespace as In

    ins = [In(name="inputs_embeds", type=dtype, shape=["batch", "seq", 8]),
           In(name="attention_mask", type="tensor(int64)", shape=["batch", "total"]),
           In(name="position_ids", type="tensor(int64)", shape=[3, "batch", "seq"])]
    ins += [In(name=f"past_key_values.{i}.{kv}", type=dtype, shape=["batch", 2, "past", 4])
            for i in range(layers) for kv in ("key", "value")]
    ins += [In(name=f"deepstack_embeds.{k}", type=dtype, shape=["batch", "seq", 8]) for k in range(deepstack)]
    return ins + [In(name=n, type="tensor(float)", shape=[1]) for n in extra]


@pytest.mark.parametrize("dtype", ["tensor(float)", "tensor(float16)"])
def test_prefill_feeds_follow_the_declared_inputs(dtype: str, models: dict[str, Any]) -> None:
    spec = host.TextSpec.from_config("qwen3_vl", models["qwen3_vl"].config)
    ids, mask, _, _ = _batch(spec, "qwen3_vl")
    np_dt = np.float16 if dtype == "tensor(float16)" else np.float32
    rng = np.random.default_rng(2)
    embeds = rng.standard_normal((*ids.shape, 8)).astype(np.float32)
    pos = np.zeros((3, *ids.shape), np.int32)
    f = host.prefill_feeds(_inputs(dtype, extra=("other",)), embeds, mask, pos)
    assert "other" not in f and len(f) == 3 + 4  # an input the host does not know is left to the caller
    assert f["inputs_embeds"].dtype == np_dt and f["position_ids"].dtype == np.int64
    assert all(f[f"past_key_values.{i}.{kv}"].shape == (2, 2, 0, 4) and f[f"past_key_values.{i}.{kv}"].dtype == np_dt
               for i in range(2) for kv in ("key", "value"))
    # a past given: layer i's key and value in order, in the graph's dtype
    past = [np.full((2, 2, 3, 4), j, np.float32) for j in range(4)]
    f = host.prefill_feeds(_inputs(dtype), embeds, mask, pos, past=past)
    assert [int(f[f"past_key_values.{i}.{kv}"][0, 0, 0, 0]) for i in range(2) for kv in ("key", "value")] == [0, 1, 2, 3]
    assert f["past_key_values.1.value"].dtype == np_dt
    # deepstack: zeros when absent, compact maps scattered at the visual tokens, dense ones cast
    vis = host.visual_mask(ids, spec)
    maps = [rng.standard_normal((int(vis.sum()), 8)).astype(np.float32) for _ in range(3)]
    f = host.prefill_feeds(_inputs(dtype, deepstack=3), embeds, mask, pos)
    assert all(f[f"deepstack_embeds.{k}"].shape == embeds.shape and not f[f"deepstack_embeds.{k}"].any() for k in range(3))
    f = host.prefill_feeds(_inputs(dtype, deepstack=3), embeds, mask, pos, maps, vis)
    dense = host.scatter_deepstack(ids, maps, spec, np_dt)
    for k in range(3):
        assert f[f"deepstack_embeds.{k}"].dtype == np_dt
        np.testing.assert_array_equal(f[f"deepstack_embeds.{k}"], dense[k])
    g = host.prefill_feeds(_inputs(dtype, deepstack=3), embeds, mask, pos, host.scatter_deepstack(ids, maps, spec))
    assert all(np.array_equal(g[k], f[k]) and g[k].dtype == f[k].dtype for k in f)
    with pytest.raises(ValueError, match="takes 3 deepstack maps, 2"):
        host.prefill_feeds(_inputs(dtype, deepstack=3), embeds, mask, pos, maps[:2], vis)
    # a graph exported without deepstack inputs takes none of the maps
    assert not any(k.startswith("deepstack") for k in host.prefill_feeds(_inputs(dtype), embeds, mask, pos, maps, vis))


def test_teacher_forced_appends_the_tail() -> None:
    rng = np.random.default_rng(3)
    embeds = rng.standard_normal((1, 5, 8)).astype(np.float16)
    tail = rng.standard_normal((1, 3, 8)).astype(np.float32)
    mask = np.ones((1, 5), np.int64)
    pos = np.broadcast_to(np.arange(5), (3, 1, 5)).copy()
    deltas = np.asarray([[2]])
    deep = [rng.standard_normal((1, 5, 8)).astype(np.float16)]
    emb, m, p, d = host.teacher_forced(embeds, mask, pos, deltas, tail, deep)
    want_pos, want_mask = host.continue_position_ids(pos, mask, deltas, 3)
    np.testing.assert_array_equal(p, want_pos)
    np.testing.assert_array_equal(m, want_mask)
    assert emb.dtype == np.float16 and emb.shape == (1, 8, 8) and (emb[:, 5:] == tail.astype(np.float16)).all()
    assert d[0].shape == (1, 8, 8) and (d[0][:, :5] == deep[0]).all() and not d[0][:, 5:].any()


def test_prompt_ids() -> None:
    from types import SimpleNamespace

    from stages.lib.hostside.prompt_ids import image_prompt_ids, text_ids

    def tok(text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        assert not add_special_tokens
        return {"input_ids": [len(w) for w in text.split()]}

    assert text_ids(tok, "a bb ccc", 7) == [1, 2, 3, 1, 2, 3, 1]  # repeated to the length asked
    assert text_ids(tok, "a bb ccc dddd", 2) == [1, 2]
    assert text_ids(tok, "", 3, empty=[0]) == [0, 0, 0]
    with pytest.raises(ValueError, match="no tokens"):
        text_ids(tok, "", 3)
    cfg = SimpleNamespace(vision_start_token_id=90, image_token_id=91, vision_end_token_id=92)
    assert image_prompt_ids([1, 2], [3], 3, cfg) == [1, 2, 90, 91, 91, 91, 92, 3]
