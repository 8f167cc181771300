"""Load-time checks across config sections: combinations the stages would otherwise refuse
only when they run (minutes or hours into a build). Pure config checks: nothing here imports
torch or a stage module; the stages keep their own checks for the inputs they are handed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.errors import ConfigError

if TYPE_CHECKING:
    from pipeline.config import BuildConfig

# calibration.source: folder reads these (stages/lib/qdq/calibset.py imports this tuple)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")
# the synthetic image generator (stages/reference.py) draws rectangles 8 .. side/2 pixels wide
SYNTHETIC_MIN_SIDE = 18
# a prefill is the prompt's text tokens + vision start/end + at least one image token
_IMAGE_BLOCK_MIN = 3


def check_config(cfg: BuildConfig, path: Path) -> None:
    """Raise ConfigError (one line: file, key, what was expected) for the first conflict."""
    for check in (_image_sizes, _held_out, _decoder_lengths, _calibration_folder, _held_out_folder):
        problem = check(cfg)
        if problem:
            raise ConfigError(f"{path}: {problem}")


def _image_sizes(cfg: BuildConfig) -> str | None:
    """Every image size the build feeds must fit the vision engine's profile. A bring-your-own
    ONNX is fed every image at its own ``resize``: the other sizes do not apply to it."""
    if _byo(cfg):
        return None
    vp = cfg.profiles.vision
    lo, hi = vp.min_image, vp.max_image
    if not (lo[0] <= vp.opt_image[0] <= hi[0] and lo[1] <= vp.opt_image[1] <= hi[1]):
        return f"profiles.vision: expected min_image <= opt_image <= max_image, got {lo}/{vp.opt_image}/{hi}"
    sizes = [("export.sample_image", cfg.export.sample_image)]
    sizes += [(f"calibration.image_sizes[{i}]", hw) for i, hw in enumerate(cfg.calibration.image_sizes)]
    sizes += [(f"verify.image_sizes[{i}]", hw) for i, hw in enumerate(cfg.verify.image_sizes)]
    for where, (h, w) in sizes:
        if not (lo[0] <= h <= hi[0] and lo[1] <= w <= hi[1]):
            return (f"{where}: image {h}x{w} is outside the vision profile "
                    f"(profiles.vision min_image {lo[0]}x{lo[1]}, max_image {hi[0]}x{hi[1]})")
    synthetic = [(f"verify.image_sizes[{i}]", hw) for i, hw in enumerate(cfg.verify.image_sizes)]
    if cfg.calibration.source == "synthetic":
        synthetic += [(f"calibration.image_sizes[{i}]", hw) for i, hw in enumerate(cfg.calibration.image_sizes)]
    for where, (h, w) in synthetic:
        if min(h, w) < SYNTHETIC_MIN_SIDE:
            return (f"{where}: image {h}x{w} is too small for the synthetic image set "
                    f"(expected sides of at least {SYNTHETIC_MIN_SIDE} pixels)")
    n = min(2, len(cfg.verify.image_sizes))  # export parity runs two verify images at once
    if n > vp.max_images:
        return (f"profiles.vision.max_images: export parity runs {n} verify.image_sizes at once, "
                f"expected max_images >= {n}, got {vp.max_images}")
    return None


def _held_out(cfg: BuildConfig) -> str | None:
    """The held-out set must not repeat the calibration set (stages/reference.py checks again)."""
    v, c = cfg.verify, cfg.calibration
    if v.images is not None and c.source == "folder" and c.images is not None:
        both = _same_files(v.images, c.images)
        if both:
            return (f"verify.images: {both[0]} is also a calibration image ({both[1]}, same content); "
                    "expected held-out images the scales were not fitted to")
    if v.images is None and c.source == "synthetic" and v.seed == c.seed:
        return (f"verify.seed: {v.seed} equals calibration.seed, so the held-out set would repeat the "
                "calibration images; expected another verify.seed")
    shared = [list(s) for s in v.image_sizes if s in c.image_sizes]
    if shared:
        return (f"verify.image_sizes: {shared} are also calibration.image_sizes; expected held-out "
                "images of other shapes (a graph that baked in a shape must fail verification)")
    return None


def _same_files(a: Path, b: Path) -> tuple[Path, Path] | None:
    """The first image of folder ``a`` whose bytes equal one in folder ``b`` (sizes first, then sha256)."""
    import hashlib

    def files(d: Path) -> list[Path]:
        try:
            return sorted(p for p in d.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        except OSError:
            return []

    def digest(p: Path) -> str:
        return hashlib.sha256(p.read_bytes()).hexdigest()

    by_size: dict[int, list[Path]] = {}
    for p in files(b):
        by_size.setdefault(p.stat().st_size, []).append(p)
    for p in files(a):
        for q in by_size.get(p.stat().st_size, []):
            if digest(p) == digest(q):
                return p, q
    return None


def _byo(cfg: BuildConfig) -> bool:
    m = cfg.model
    return m.checkpoint is None and m.generate is None


def has_decoder(cfg: BuildConfig) -> bool:
    """Whether the model has a language decoder (a CNN or a bring-your-own vision ONNX has none)."""
    m = cfg.model
    return m.generate != "cnn-tiny" and not (m.checkpoint is None and m.generate is None)


def _decoder_lengths(cfg: BuildConfig) -> str | None:
    """Prefill and generation lengths must fit the decoder engine's profile."""
    if not has_decoder(cfg):
        return None
    seq, past = cfg.profiles.decoder.seq, cfg.profiles.decoder.past
    spl = cfg.export.sample_prompt_len
    if not seq.min <= spl <= seq.max:
        return (f"export.sample_prompt_len: {spl} is outside profiles.decoder.seq "
                f"(expected {seq.min}..{seq.max})")
    for key, n in (("calibration.prompt_len", cfg.calibration.prompt_len), ("verify.prompt_len", cfg.verify.prompt_len)):
        if n + _IMAGE_BLOCK_MIN > seq.max:
            return (f"{key}: a prefill is {n} text tokens + the image block (at least {_IMAGE_BLOCK_MIN} tokens), "
                    f"longer than profiles.decoder.seq.max {seq.max}; expected prompt_len <= "
                    f"{seq.max - _IMAGE_BLOCK_MIN}")
    # greedy generation of N tokens: the last step's past holds the prefill + N - 2 tokens
    need = cfg.verify.prompt_len + _IMAGE_BLOCK_MIN + cfg.verify.generate_tokens - 2
    if need > past.max:
        return (f"verify.generate_tokens: generating {cfg.verify.generate_tokens} tokens after a "
                f"{cfg.verify.prompt_len}-token prompt needs a past of at least {need} tokens, more than "
                f"profiles.decoder.past.max {past.max}")
    return None


def _calibration_folder(cfg: BuildConfig) -> str | None:
    """calibration.source: folder: images present, every prompt line a record, named images
    there; prompts for a model with a decoder (a vision-only model has no use for them)."""
    c = cfg.calibration
    if c.source != "folder" or c.images is None:
        return None  # the model validators already refused a missing folder or file
    if c.prompts is None and has_decoder(cfg):
        return ("calibration.prompts: the model has a decoder, which calibrates on prompts too; "
                "expected a JSONL file of " + PROMPT_RECORD)
    return _folder("calibration.", c.images, c.prompts if has_decoder(cfg) else None)


def _held_out_folder(cfg: BuildConfig) -> str | None:
    """verify.images (and verify.prompts, for a model with a decoder): as calibration's."""
    v = cfg.verify
    if v.images is None:
        return f"verify.prompts: {v.prompts} is set without verify.images" if v.prompts is not None else None
    return _folder("verify.", v.images, v.prompts if has_decoder(cfg) else None)


def _folder(section: str, images: Path, prompts: Path | None) -> str | None:
    """``section``: the key prefix the lines name (``calibration.``, ``verify.``)."""
    try:
        names = {p.name for p in images.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()}
    except OSError as e:
        return f"{section}images: {images} cannot be read ({e.strerror or e})"
    if not names:
        return f"{section}images: {images} has no images (expected files ending {', '.join(IMAGE_SUFFIXES)})"
    if prompts is None:
        return None
    try:
        records = read_prompt_records(prompts)
    except ValueError as e:
        return f"{section}prompts: {e}"
    for i, rec in records:
        image = rec.get("image")
        if image not in (None, "") and (not isinstance(image, str) or image not in names):
            return (f"{section}prompts: {prompts}:{i}: names image {image!r}, which is not an image "
                    f"in {images}")
    return None


PROMPT_RECORD = '{"prompt": "...", "image": optional file name in calibration.images}'


def read_prompt_records(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, record) of a JSONL prompts file: the one reader for the load-time check and
    the calibrate stage. Raises ValueError, one line naming the file (and the line)."""
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        why = "not UTF-8 text" if isinstance(e, UnicodeDecodeError) else (e.strerror or str(e))
        raise ValueError(f"{path} cannot be read ({why}; expected a JSONL file)") from None
    records = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            rec = None
        if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), str):
            raise ValueError(f"{path}:{i}: expected {PROMPT_RECORD}")
        records.append((i, rec))
    if not records:
        raise ValueError(f"{path} has no prompts (expected one {PROMPT_RECORD} per line)")
    return records
