"""The numpy host-side helpers equal the transformers code paths they mirror."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from stages.lib.checkpoints import local as ck
from stages.lib.checkpoints.tiny import generate_tiny, tiny_config
from stages.lib.hostside import vision as hv

GRIDS = [[[1, 8, 12]], [[1, 8, 12], [1, 14, 10]], [[2, 6, 4], [1, 4, 16]]]


def _spec(family: str) -> hv.VisionSpec:
    return hv.VisionSpec.from_config(family, tiny_config(family).vision_config)


@pytest.mark.parametrize("grid", GRIDS)
def test_position_ids_match_transformers(grid: list[list[int]]) -> None:
    import torch
    from transformers.vision_utils import get_vision_position_ids

    want = get_vision_position_ids(torch.tensor(grid), 2).numpy()
    np.testing.assert_array_equal(hv.position_ids(_spec("qwen2_vl"), grid), want)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_rotary_tables_match_the_model_module(family: str) -> None:
    import importlib

    import torch
    from transformers.vision_utils import get_vision_position_ids

    cfg = tiny_config(family).vision_config
    mod = importlib.import_module(ck.VISION_CLASSES[family][0])
    rot_cls = next(getattr(mod, n) for n in dir(mod) if n.endswith("VisionRotaryEmbedding"))
    grid = GRIDS[1]
    cos, sin = rot_cls(cfg)(torch.zeros(1), get_vision_position_ids(torch.tensor(grid), 2))
    hcos, hsin = hv.rotary_tables(hv.VisionSpec.from_config(family, cfg), grid)
    np.testing.assert_allclose(hcos, cos.numpy(), atol=1e-6)
    np.testing.assert_allclose(hsin, sin.numpy(), atol=1e-6)


@pytest.mark.parametrize("grid", GRIDS)
def test_window_segments_match_window_index(grid: list[list[int]]) -> None:
    """Per-patch window ids in processor order == transformers' window_index/cu_window_seqlens."""
    import torch
    from transformers.vision_utils import get_vision_window_index

    spec = _spec("qwen2_5_vl")
    widx, cu = get_vision_window_index(torch.tensor(grid), 2, spec.window_size, spec.patch_size)
    unit = spec.merge_size**2
    # window of each permuted merged token, then scattered back to processor order
    win_perm = np.searchsorted(cu.numpy()[1:], np.arange(len(widx)) * unit, side="right")
    want = np.empty(len(widx), np.int64)
    want[widx.numpy()] = win_perm
    got = hv.window_segments(spec, grid)
    np.testing.assert_array_equal(got, np.repeat(want, unit))
    assert len(np.unique(got)) > len(grid)  # several windows per image: the test is not trivial


@pytest.mark.parametrize("grid", GRIDS)
def test_pos_interpolation_matches_transformers(grid: list[list[int]]) -> None:
    import torch
    from transformers.vision_utils import get_vision_interpolation_indices_and_weights

    spec = _spec("qwen3_vl")
    idx, w = get_vision_interpolation_indices_and_weights(
        torch.tensor(grid), spec.num_grid_per_side, mode="bilinear", align_corners=True, spatial_merge_size=2)
    hidx, hw = hv.pos_interpolation(spec, grid)
    np.testing.assert_array_equal(hidx, idx.numpy())
    np.testing.assert_allclose(hw, w.numpy(), atol=1e-6)


def test_segments_and_feed_names() -> None:
    spec = _spec("qwen3_vl")
    pv = np.zeros((96 + 140, spec.patch_dim), np.float32)
    feeds = hv.vision_inputs(spec, pv, [[1, 8, 12], [1, 14, 10]])
    assert list(feeds) == hv.input_names(spec)
    np.testing.assert_array_equal(np.bincount(feeds["attn_segments"]), [96, 140])
    assert hv.num_image_tokens(spec, [[1, 8, 12], [1, 14, 10]]) == [24, 35]
    with pytest.raises(ValueError, match="grid_thw implies"):
        hv.vision_inputs(spec, pv[:-1], [[1, 8, 12], [1, 14, 10]])


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl"])
def test_numpy_patchifier_matches_the_processor(family: str, tmp_path: Path) -> None:
    path = generate_tiny(family, tmp_path / family)
    image_proc, _ = ck.load_processor(path)
    spec = hv.VisionSpec.from_config(family, tiny_config(family).vision_config, image_proc)
    f = spec.factor
    imgs = [hv.synthetic_image(4 * f, 6 * f, 0), hv.synthetic_image(3 * f, 2 * f, 1)]
    a, ga = hv.preprocess(imgs, spec, image_proc)
    b, gb = hv.preprocess(imgs, spec, None)
    np.testing.assert_array_equal(ga, gb)
    np.testing.assert_allclose(a, b, atol=1e-5)
    assert hv.VisionSpec.from_dict(spec.as_dict()) == spec
