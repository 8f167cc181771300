"""The held-out set's data, as the reference stage draws it: real files (``verify.images``,
``verify.prompts``) or the deterministic synthetic set, never the calibration set's."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from pipeline.stage import StageError
from stages.lib.qdq.calibset import synthetic_image

__all__ = ["check_held_out", "held_out_images", "held_out_prompts", "held_out_source"]


def check_held_out(p: dict[str, Any]) -> None:
    cal = p["calibration"]
    if p.get("vision_onnx") is not None:  # a BYO graph sees every image at its own resize
        return
    if not p.get("images") and cal["source"] == "synthetic" and int(p["seed"]) == int(cal["seed"]):
        raise StageError(f"verify.seed ({p['seed']}) equals calibration.seed: the held-out set would "
                         "repeat the calibration images; choose another verify.seed")
    shared = [s for s in p["image_sizes"] if s in cal["image_sizes"]]
    if shared:
        raise StageError(f"verify.image_sizes {shared} are also calibration.image_sizes: held-out images "
                         "must have other shapes (a graph that baked in a shape must fail here)")


def held_out_images(p: dict[str, Any], resize: bool = True) -> list[tuple[str, np.ndarray, np.random.Generator]]:
    """(name, HxWx3 uint8 image, the sample's generator) per held-out sample: the first
    ``samples`` files of ``verify.images`` (sorted; resized to ``image_sizes`` in turn unless
    ``resize`` is False: a BYO graph's own preprocessing resizes once), else synthetic images."""
    from stages.lib.qdq.calibset import image_files, read_image, read_rgb

    rngs = [np.random.default_rng([int(p["seed"]), i]) for i in range(int(p["samples"]))]
    sizes = p["image_sizes"]
    if not p.get("images"):
        hw = [(int(sizes[i % len(sizes)][0]), int(sizes[i % len(sizes)][1])) for i in range(len(rngs))]
        return [(f"synthetic-{k}", synthetic_image(h, w, r), r) for k, ((h, w), r) in enumerate(zip(hw, rngs, strict=True))]
    files = image_files(Path(p["images"]), key="verify.images")[: len(rngs)]
    return [(f.name, read_image(f, tuple(sizes[i % len(sizes)])) if resize else read_rgb(f), rngs[i])
            for i, f in enumerate(files)]


def held_out_prompts(p: dict[str, Any]) -> list[str] | None:
    """The texts of ``verify.prompts`` (None: word prompts drawn per sample)."""
    from stages.lib.qdq.calibset import read_prompts

    return [r["prompt"] for r in read_prompts(Path(p["prompts"]), key="verify.prompts")] if p.get("prompts") else None


def held_out_source(p: dict[str, Any]) -> str:
    """Which data graded the build, as the report says it."""
    if not p.get("images"):
        return f"synthetic images (verify.seed {p['seed']})"
    return f"{p['images']}" + (f" with prompts {p['prompts']}" if p.get("prompts") else "")
