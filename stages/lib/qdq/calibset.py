"""Calibration (and held-out) inputs for the exported graphs, built from images and prompts.

A sample is one image plus one prompt of prefill length. The vision graph gets the checkpoint's
own processor output plus the host-side tables (`stages.lib.hostside.vision`); the decoder gets
`inputs_embeds` from the embed graph with the vision graph's features merged at the image
placeholders, M-RoPE `position_ids`, a full attention mask and zero-length past KV: prefill
shapes, so no decoder matmul looks like a GEMV (docs/FIELD_NOTES.md §2.6).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import IMAGENET_MEAN, IMAGENET_STD
from pipeline.config_checks import IMAGE_SUFFIXES as IMAGE_SUFFIXES  # one list: load_config checks the folder
from pipeline.stage import StageError
from stages.lib.dtypes import ORT_NUMPY

WORDS = ("describe the image colors shape left right top bottom red blue green square light dark what "
         "is in a picture count objects near far").split()


@dataclass
class Sample:
    name: str  # file name or synthetic-<i>: errors name it
    image: np.ndarray  # HxWx3 uint8
    text: str


def image_files(folder: Path, key: str = "calibration.images") -> list[Path]:
    if not folder.is_dir():
        raise StageError(f"{key} {folder} is not a readable folder")
    try:
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    except OSError as e:
        raise StageError(f"{key} {folder} is not readable ({e.strerror})") from None
    if not files:
        raise StageError(f"{key} {folder} has no images ({', '.join(IMAGE_SUFFIXES)})")
    return files


def read_rgb(path: Path) -> np.ndarray:
    """The image at ``path`` as HxWx3 uint8 RGB, its own size (StageError naming the file)."""
    from stages.lib.hostside.vision import open_rgb

    return np.asarray(open_rgb(path), dtype=np.uint8)


def read_image(path: Path, size: tuple[int, int] | None) -> np.ndarray:
    """The image at ``path`` as HxWx3 uint8 RGB resized to ``size`` (None: its own); StageError
    naming the file for anything PIL cannot decode (corrupt, truncated, not an image, a
    decompression bomb)."""
    from PIL import Image

    from stages.lib.hostside.vision import open_rgb

    rgb = open_rgb(path)
    if size is None:
        return np.asarray(rgb, dtype=np.uint8)
    try:
        rgb = rgb.resize((int(size[1]), int(size[0])), Image.Resampling.BICUBIC)
    except (OSError, ValueError) as e:
        raise StageError(f"{path} cannot be resized to {size[0]}x{size[1]} ({e})") from None
    return np.asarray(rgb, dtype=np.uint8)


def read_prompts(path: Path, key: str = "calibration.prompts") -> list[dict[str, Any]]:
    from pipeline.config_checks import read_prompt_records

    try:
        return [rec for _, rec in read_prompt_records(path)]
    except ValueError as e:
        raise StageError(f"{key}: {e}") from None


def folder_samples(images: Path, prompts: Path | None, n: int,
                   sizes: Sequence[tuple[int, int]] | None) -> Iterator[Sample]:
    """``n`` samples from the folder: images in turn (or the one a prompt names), resized to
    ``sizes`` in turn (None: as they are; a BYO graph resizes them itself). No prompts (a
    vision-only model): empty texts."""
    files = image_files(images)
    recs = read_prompts(prompts) if prompts is not None else [{"prompt": ""}]
    by_name = {p.name: p for p in files}
    for i in range(n):
        rec = recs[i % len(recs)]
        if rec.get("image"):
            if rec["image"] not in by_name:
                raise StageError(f"{prompts}: prompt {i + 1} names image {rec['image']!r}, not in {images}")
            path = by_name[rec["image"]]
        else:
            path = files[i % len(files)]
        yield Sample(path.name, read_image(path, sizes[i % len(sizes)] if sizes else None), rec["prompt"])


def synthetic_image(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """Smooth gradients, a few rectangles and mild noise: structured, not white noise, so the
    vision tower sees edges and flat regions like a photo, and the same on every machine."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    img = np.empty((h, w, 3))
    for c in range(3):
        fx, fy, ph = rng.uniform(0.5, 3.0), rng.uniform(0.5, 3.0), rng.uniform(0, 2 * np.pi)
        img[..., c] = 127 + 90 * np.sin(2 * np.pi * (fx * xx / w + fy * yy / h) + ph)
    for _ in range(4):
        y0, x0 = int(rng.integers(0, h - 8)), int(rng.integers(0, w - 8))
        img[y0:y0 + int(rng.integers(8, h // 2)), x0:x0 + int(rng.integers(8, w // 2))] = rng.uniform(0, 255, 3)
    img += rng.normal(0, 6, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def synthetic_samples(n: int, sizes: Sequence[tuple[int, int]], seed: int) -> Iterator[Sample]:
    """Deterministic structured images (gradients, rectangles, noise) and word prompts."""
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        h, w = sizes[i % len(sizes)]
        yield Sample(f"synthetic-{i}", synthetic_image(int(h), int(w), rng), " ".join(rng.choice(WORDS, 48)))


class Feeder:
    """Turns samples into feeds for the vision and decoder graphs of one checkpoint."""

    def __init__(self, checkpoint: Path, family: str, prompt_len: int, embed_sess: Any,
                 trust_remote_code: bool = False):
        from stages.lib.checkpoints.local import load_config_hf, load_processor
        from stages.lib.hostside.text import TextSpec
        from stages.lib.hostside.vision import VisionSpec

        self.config = load_config_hf(checkpoint, trust_remote_code)
        self.image_processor, self.tokenizer = load_processor(checkpoint, trust_remote_code)
        self.vspec = VisionSpec.from_config(family, self.config.vision_config, self.image_processor)
        self.tspec = TextSpec.from_config(family, self.config)
        self.prompt_len, self.embed = prompt_len, embed_sess

    def vision(self, s: Sample) -> tuple[dict[str, np.ndarray], np.ndarray]:
        from stages.lib.hostside.vision import preprocess, vision_inputs

        pv, grid = preprocess([s.image], self.vspec, self.image_processor)
        return vision_inputs(self.vspec, pv, grid), grid

    def prompt_ids(self, text: str) -> list[int]:
        from stages.lib.hostside.prompt_ids import text_ids

        return text_ids(self.tokenizer, text, self.prompt_len, empty=[0])  # prefill length: short ones repeat

    def decoder(self, s: Sample, grid: np.ndarray, vision_out: Mapping[str, np.ndarray],
                inputs: Sequence[Any]) -> dict[str, np.ndarray]:
        """Feeds for every declared decoder input (`inputs`: the session's NodeArg list, or
        `segments.graph_inputs`), in the types they declare."""
        from stages.lib.hostside import text as T
        from stages.lib.hostside.prompt_ids import image_prompt_ids
        from stages.lib.hostside.vision import num_image_tokens

        c, ids = self.config, self.prompt_ids(s.text)
        k = len(ids) // 3  # text on both sides of the image, as the reference set does
        n_img = sum(num_image_tokens(self.vspec, grid))  # one block holds every image's tokens
        input_ids = np.asarray([image_prompt_ids(ids[:k], ids[k:], n_img, c)], np.int64)
        embeds = self.embed.run(None, {self.embed.get_inputs()[0].name: input_ids})[0]
        embeds = T.merge_image_features(embeds, input_ids, next(iter(vision_out.values())), int(c.image_token_id))
        mask = np.ones_like(input_ids)
        pos, _ = T.rope_index(self.tspec, input_ids, image_grid_thw=grid, attention_mask=mask)
        # export_vision writes the deepstack maps stacked, [n_deepstack, tokens, H]: one per layer
        stacked = next((v for k2, v in vision_out.items() if "deepstack" in k2), None)
        deep = list(stacked) if stacked is not None else []
        feed = T.prefill_feeds(inputs, embeds, mask, pos, deep, T.visual_mask(input_ids, self.tspec))
        unknown = [a.name for a in inputs if a.name not in feed]
        if unknown:
            raise StageError(f"decoder input {unknown[0]!r} is not one calibration knows how to feed")
        # not a graph input: where the image rows are, for the vision search's decoder objective
        return {**feed, "input_ids": input_ids}


def cast_feed(sess: Any, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Cast each array to the dtype the session declares (fp16 graphs take fp16 inputs). ``sess``:
    a session, or its inputs (``segments.graph_inputs`` for a graph not opened whole)."""
    out = {}
    for a in sess.get_inputs() if hasattr(sess, "get_inputs") else sess:
        if a.name not in feed:
            raise StageError(f"graph input {a.name!r} has no feed")
        dt = ORT_NUMPY.get(a.type)
        out[a.name] = np.ascontiguousarray(feed[a.name].astype(dt) if dt is not None else feed[a.name])
    return out


class ImageFeeder:
    """Feeds for a vision-only graph (CNN backbone or bring-your-own ONNX): one normalized
    image tensor, preprocessed as its `vision.json` says (layout, mean/std, fixed resize)."""

    def __init__(self, io_spec: Mapping[str, Any]):
        pre = dict(io_spec.get("preprocess") or {})
        inputs = io_spec.get("inputs") or [{"name": "pixel_values"}]
        self.name = str(pre.get("input_name") or inputs[0]["name"])
        self.layout = str(pre.get("layout") or io_spec.get("layout") or "NCHW")
        self.mean = np.asarray(pre.get("mean", IMAGENET_MEAN), np.float32)
        self.std = np.asarray(pre.get("std", IMAGENET_STD), np.float32)
        self.resize = tuple(pre["resize"]) if pre.get("resize") else None  # BYO graphs have a fixed size
        # keep-aspect (a BYO graph dynamic in H and W): sizes inside min..max, multiples of stride
        self.keep_aspect = pre.get("fit") == "keep-aspect"
        self.stride = int(pre.get("stride") or 32)
        self.bounds = (tuple(pre.get("min_image") or (1, 1)), tuple(pre.get("max_image") or (4096, 4096)))

    def size_for(self, h: int, w: int) -> tuple[int, int]:
        """The (H, W) an ``h`` x ``w`` image is resized to. keep-aspect: scaled to fit max_image
        (never below min_image), then each side rounded to a multiple of ``stride`` inside the
        bounds (as OCR detectors' "limit side" resizing does); else the declared resize."""
        if not self.keep_aspect:
            return (int(self.resize[0]), int(self.resize[1])) if self.resize is not None else (h, w)
        (lo_h, lo_w), (hi_h, hi_w) = self.bounds
        r = max(min(1.0, hi_h / h, hi_w / w), lo_h / h, lo_w / w)
        st = self.stride

        def side(x: float, lo: int, hi: int) -> int:
            lo_s, hi_s = -(-int(lo) // st) * st, max(st, int(hi) // st * st)
            return int(min(max(round(x / st) * st, lo_s, st), hi_s))

        return side(h * r, lo_h, hi_h), side(w * r, lo_w, hi_w)

    def vision(self, s: Sample) -> tuple[dict[str, np.ndarray], None]:
        from PIL import Image

        img = s.image
        size = self.size_for(*img.shape[:2])
        if img.shape[:2] != size:
            img = np.asarray(Image.fromarray(img).resize((size[1], size[0]), Image.Resampling.BICUBIC))
        x = (img.astype(np.float32) / 255.0 - self.mean) / self.std
        x = x.transpose(2, 0, 1) if self.layout == "NCHW" else x
        return {self.name: np.ascontiguousarray(x[None])}, None
