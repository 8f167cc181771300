"""Host-side helpers for the exported vision encoder: numpy, no torch needed at run time.

The exported vision graph (``stages/export_vision.py``) takes every data-dependent tensor
precomputed, so that one graph (and one TensorRT engine) serves any number of images of any
size in the profile. What the host computes, per patch (processor order, i.e. spatial-merge
block-major, images one after the other):

* ``rotary_cos``/``rotary_sin`` [N, head_dim] FP32 -- the 2-D axial vision RoPE tables;
* ``attn_segments`` [N] int64 -- which image (frame) a patch belongs to: attention only
  within a segment (replaces ``cu_seqlens`` and the per-image split of the eager model);
* ``window_segments`` [N] int64 (Qwen2.5-VL) -- the attention window of a patch for the
  windowed blocks. Attention with a mask is permutation-equivariant, so the graph needs no
  ``window_index`` gather/argsort: windows are expressed as segments in processor order;
* ``pos_interp_index``/``pos_interp_weight`` [N, 4] (Qwen3-VL) -- bilinear taps into the learned
  position-embedding grid.

Every function is the numpy twin of the transformers code path named in its docstring;
``tests/test_hostside_vision.py`` checks them against transformers.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")


@dataclass(frozen=True)
class VisionSpec:
    """The config scalars the host needs (recorded in ``vision.json``)."""

    family: str
    patch_size: int
    temporal_patch_size: int
    merge_size: int
    in_channels: int
    head_dim: int
    rope_theta: float
    window_size: int = 0  # Qwen2.5-VL: window in pixels (0: no windowed attention)
    fullatt_blocks: tuple[int, ...] = ()
    num_grid_per_side: int = 0  # Qwen3-VL: learned position grid side
    deepstack_layers: tuple[int, ...] = ()
    image_mean: tuple[float, ...] = field(default=(0.48145466, 0.4578275, 0.40821073))
    image_std: tuple[float, ...] = field(default=(0.26862954, 0.26130258, 0.27577711))

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @property
    def factor(self) -> int:
        """Image sides are multiples of this (one merged token)."""
        return self.patch_size * self.merge_size

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict[str, Any]) -> VisionSpec:
        tuples = ("fullatt_blocks", "deepstack_layers", "image_mean", "image_std")
        kwargs: dict[str, Any] = {k: tuple(v) if k in tuples else v for k, v in d.items()}
        return VisionSpec(**kwargs)

    @staticmethod
    def from_config(family: str, vision_config: Any, image_processor: Any = None) -> VisionSpec:
        vc = vision_config
        dim = vc.embed_dim if family == "qwen2_vl" else vc.hidden_size
        rope = getattr(vc, "rope_parameters", None) or {}
        extra: dict[str, Any] = {}
        if image_processor is not None:
            extra = {"image_mean": tuple(image_processor.image_mean), "image_std": tuple(image_processor.image_std)}
        return VisionSpec(
            family=family,
            patch_size=int(vc.patch_size),
            temporal_patch_size=int(vc.temporal_patch_size),
            merge_size=int(vc.spatial_merge_size),
            in_channels=int(vc.in_channels),
            head_dim=int(dim // vc.num_heads),
            rope_theta=float(rope.get("rope_theta", 10000.0)),
            window_size=int(getattr(vc, "window_size", 0) or 0) if family == "qwen2_5_vl" else 0,
            fullatt_blocks=tuple(getattr(vc, "fullatt_block_indexes", ()) or ()) if family == "qwen2_5_vl" else (),
            num_grid_per_side=int(vc.num_position_embeddings**0.5) if family == "qwen3_vl" else 0,
            deepstack_layers=tuple(getattr(vc, "deepstack_visual_indexes", ()) or ()) if family == "qwen3_vl" else (),
            **extra,
        )


def input_names(spec: VisionSpec) -> list[str]:
    names = ["pixel_values", "rotary_cos", "rotary_sin", "attn_segments"]
    if spec.window_size:
        names.append("window_segments")
    if spec.num_grid_per_side:
        names += ["pos_interp_index", "pos_interp_weight"]
    return names


def _grid(grid_thw: Any) -> np.ndarray:
    g = np.asarray(grid_thw, dtype=np.int64).reshape(-1, 3)
    return g


def position_ids(spec: VisionSpec, grid_thw: Any) -> np.ndarray:
    """[N, 2] (h, w) patch coordinates, block-major (``vision_utils.get_vision_position_ids``)."""
    m = spec.merge_size
    out = []
    for t, h, w in _grid(grid_thw).tolist():
        hh, ww = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        shape = (h // m, m, w // m, m)
        hp = hh.reshape(shape).transpose(0, 2, 1, 3).reshape(-1)
        wp = ww.reshape(shape).transpose(0, 2, 1, 3).reshape(-1)
        out.append(np.tile(np.stack([hp, wp], axis=-1), (t, 1)))
    return np.concatenate(out, axis=0).astype(np.int64)


def rotary_tables(spec: VisionSpec, grid_thw: Any) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin [N, head_dim] FP32 (``*VisionRotaryEmbedding.forward``, axial, scaling 1)."""
    spatial = spec.head_dim // 2
    inv_freq = 1.0 / (spec.rope_theta ** (np.arange(0, spatial, 2, dtype=np.float32) / spatial))
    pos = position_ids(spec, grid_thw).astype(np.float32)
    freqs = pos[..., None] * inv_freq.astype(np.float32)  # [N, 2, spatial/2]
    hw = np.concatenate([freqs[:, 0], freqs[:, 1]], axis=-1)  # [N, spatial]
    full = np.concatenate([hw, hw], axis=-1)
    return np.cos(full).astype(np.float32), np.sin(full).astype(np.float32)


def attn_segments(spec: VisionSpec, grid_thw: Any) -> np.ndarray:
    """[N] segment id: one per image frame (``get_vision_cu_seqlens`` as per-patch ids)."""
    sizes = [h * w for t, h, w in _grid(grid_thw).tolist() for _ in range(t)]
    return np.repeat(np.arange(len(sizes), dtype=np.int64), sizes)


def window_segments(spec: VisionSpec, grid_thw: Any) -> np.ndarray:
    """[N] window id per patch in processor order (``get_vision_window_index`` as segments)."""
    m = spec.merge_size
    ws = spec.window_size // m // spec.patch_size
    out, base = [], 0
    for t, h, w in _grid(grid_thw).tolist():
        gh, gw = h // m, w // m
        nwh, nww = -(-gh // ws), -(-gw // ws)
        ti, ii, jj = np.meshgrid(np.arange(t), np.arange(gh), np.arange(gw), indexing="ij")
        win = base + ti * (nwh * nww) + (ii // ws) * nww + (jj // ws)
        out.append(np.repeat(win.reshape(-1), m * m))
        base += t * nwh * nww
    return np.concatenate(out).astype(np.int64)


def pos_interpolation(spec: VisionSpec, grid_thw: Any) -> tuple[np.ndarray, np.ndarray]:
    """[N, 4] indices and weights resampling the learned grid (bilinear, align_corners=True),
    block-major (``vision_utils.get_vision_interpolation_indices_and_weights``)."""
    side, m = spec.num_grid_per_side, spec.merge_size
    idx_all, w_all = [], []
    for t, h, w in _grid(grid_thw).tolist():
        pos = position_ids(spec, [[1, h, w]])

        def taps(coord: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
            src = coord.astype(np.float32) * (side - 1) / max(size - 1, 1)
            floor = np.floor(src)
            raw = floor[:, None].astype(np.int64) + np.arange(2)
            wts = np.clip(1 - np.abs(src[:, None] - floor[:, None] - np.arange(2)), 0, None)
            return np.clip(raw, 0, side - 1), wts.astype(np.float32)

        ht, hw_ = taps(pos[:, 0], h)
        wt, ww_ = taps(pos[:, 1], w)
        idx = (ht[:, :, None] * side + wt[:, None, :]).reshape(-1, 4)
        wts = (hw_[:, :, None] * ww_[:, None, :]).reshape(-1, 4)
        idx_all.append(np.tile(idx, (t, 1)))
        w_all.append(np.tile(wts, (t, 1)))
    del m
    return np.concatenate(idx_all).astype(np.int64), np.concatenate(w_all).astype(np.float32)


def vision_inputs(spec: VisionSpec, pixel_values: Any, grid_thw: Any) -> dict[str, np.ndarray]:
    """Every input of the exported vision graph, by name."""
    pv = np.ascontiguousarray(np.asarray(pixel_values, dtype=np.float32))
    g = _grid(grid_thw)
    n = int((g[:, 0] * g[:, 1] * g[:, 2]).sum())
    if pv.shape != (n, spec.patch_dim):
        raise ValueError(f"pixel_values has shape {pv.shape}, grid_thw implies {(n, spec.patch_dim)}")
    cos, sin = rotary_tables(spec, g)
    feeds = {"pixel_values": pv, "rotary_cos": cos, "rotary_sin": sin, "attn_segments": attn_segments(spec, g)}
    if spec.window_size:
        feeds["window_segments"] = window_segments(spec, g)
    if spec.num_grid_per_side:
        feeds["pos_interp_index"], feeds["pos_interp_weight"] = pos_interpolation(spec, g)
    return feeds


def num_image_tokens(spec: VisionSpec, grid_thw: Any) -> list[int]:
    """Merged tokens (rows of ``image_features``) per image."""
    return [int(t * h * w) // spec.merge_size**2 for t, h, w in _grid(grid_thw).tolist()]


def synthetic_image(height: int, width: int, seed: int) -> np.ndarray:
    """A deterministic HxWx3 uint8 image with structure (gradients + noise), not flat noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([xx / max(width - 1, 1), yy / max(height - 1, 1), (xx + yy) / (height + width)], -1)
    img = 0.7 * base + 0.3 * rng.random((height, width, 3), dtype=np.float32)
    return (img * 255).astype(np.uint8)


def preprocess(images: list[np.ndarray], spec: VisionSpec, image_processor: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """HxWx3 uint8 images -> (pixel_values [N, patch_dim] FP32, grid_thw [n, 3] int64).

    With the checkpoint's own image processor when given (resize rules included); otherwise a
    numpy patchifier for images whose sides are already multiples of ``spec.factor``, matching
    the processor's rescale/normalise/patch layout.
    """
    if image_processor is not None:
        from PIL import Image

        out = image_processor(images=[Image.fromarray(im) for im in images], return_tensors="np")
        return np.asarray(out["pixel_values"], np.float32), np.asarray(out["image_grid_thw"], np.int64)
    pvs, grids = [], []
    p, tp, m = spec.patch_size, spec.temporal_patch_size, spec.merge_size
    mean = np.asarray(spec.image_mean, np.float32)
    std = np.asarray(spec.image_std, np.float32)
    for im in images:
        h, w = im.shape[:2]
        if h % spec.factor or w % spec.factor:
            raise ValueError(f"image {h}x{w}: sides must be multiples of {spec.factor} without a processor")
        x = ((im.astype(np.float32) / 255.0 - mean) / std).transpose(2, 0, 1)  # C, H, W
        x = np.repeat(x[None], tp, axis=0)  # a still image fills the temporal patch
        gh, gw = h // p, w // p
        x = x.reshape(1, tp, spec.in_channels, gh // m, m, p, gw // m, m, p)
        x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
        pvs.append(x.reshape(gh * gw, spec.patch_dim))
        grids.append([1, gh, gw])
    return np.concatenate(pvs).astype(np.float32), np.asarray(grids, np.int64)


IMAGE_FORMATS = "png, jpg, bmp, webp, gif, tiff"


def open_rgb(path: Any) -> Any:
    """The image file at ``path`` decoded as an RGB ``PIL.Image``, fully loaded.

    Anything PIL cannot decode raises StageError naming the file and what was expected: an
    unidentified or corrupt file, one cut short, and a decompression bomb (PIL's pixel limit,
    whose warning is an error here: a 90-megapixel "image" in a calibration folder is a mistake
    or an attack, not a sample).
    """
    import warnings

    from PIL import Image, UnidentifiedImageError

    from pipeline.stage import StageError

    expected = f"expected an RGB image ({IMAGE_FORMATS})"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                im.load()
                return im.convert("RGB")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise StageError(f"{path} is too large to decode safely ({str(e).splitlines()[0]}); {expected}") from None
    except UnidentifiedImageError:
        raise StageError(f"{path} is corrupt or not an image (PIL cannot identify its format); {expected}") from None
    except OSError as e:
        if e.errno is None:  # PIL's own decode errors ("image file is truncated", ...)
            raise StageError(f"{path} is corrupt: {_decode_problem(e)}; {expected}") from None
        raise StageError(f"{path} cannot be read ({e.strerror}); {expected}") from None
    except (ValueError, SyntaxError) as e:  # PIL raises these for malformed chunks and headers
        raise StageError(f"{path} is corrupt: {_decode_problem(e)}; {expected}") from None


def _decode_problem(e: Exception) -> str:
    msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return f"{'truncated' if 'truncated' in msg else 'undecodable'} ({msg})"
