"""Prompt assembly without transformers: chat template (jinja2), ``tokenizers``, image preprocessing.

What the checkpoint's processor does, from the packaged files alone:
* the chat template from ``tokenizer/chat_template.jinja``, ``chat_template.json`` or
  ``tokenizer_config.json``'s ``chat_template`` (rendered like transformers: a sandboxed jinja2
  environment, ``trim_blocks``/``lstrip_blocks``); a package without one (the tiny generated
  checkpoints) gets the Qwen-VL template below;
* the text through ``tokenizers`` (``tokenizer/tokenizer.json``), each ``<|image_pad|>`` then
  expanded to the image's number of merged tokens (the processor expands the text; the special
  token is one id, so expanding ids is the same);
* each image resized by Qwen's ``smart_resize`` rule (sides multiples of patch*merge, pixel
  count within the processor's bounds, PIL bicubic) and patchified by ``hostside.vision.preprocess``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from stages.lib.hostside.generate import Prompt
from stages.lib.runtime.errors import PackageError, UsageError

# Qwen2-VL / Qwen2.5-VL's template (images and text; videos are not wired in this runtime).
QWEN_VL_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
BICUBIC = 3


@dataclass
class ChatAssets:
    tokenizer: Any  # tokenizers.Tokenizer
    template: str
    template_source: str
    special: dict[str, str] = field(default_factory=dict)  # bos_token, eos_token, ... for the template
    eos_ids: tuple[int, ...] = ()
    image: dict[str, Any] = field(default_factory=dict)  # preprocessor_config.json

    def decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True))


def _json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        doc = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PackageError(f"{path.parent.name}/{path.name}: not valid JSON ({e})") from None
    return doc if isinstance(doc, dict) else {}


def _template(folder: Path, cfg: dict[str, Any]) -> tuple[str, str]:
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(), "tokenizer/chat_template.jinja"
    ct = _json(folder / "chat_template.json").get("chat_template")
    source = "tokenizer/chat_template.json"
    if ct is None:
        ct, source = cfg.get("chat_template"), "tokenizer/tokenizer_config.json"
    if isinstance(ct, list):  # named templates: [{"name": "default", "template": ...}]
        named = {str(t.get("name")): t.get("template") for t in ct if isinstance(t, dict)}
        ct = named.get("default") or next(iter(named.values()), None)
    if isinstance(ct, str) and ct.strip():
        return ct, source
    return QWEN_VL_TEMPLATE, "built-in Qwen-VL template (the package has none)"


def _token_str(v: Any) -> str | None:
    if isinstance(v, str):
        return v
    if isinstance(v, dict) and isinstance(v.get("content"), str):  # AddedToken serialised
        return str(v["content"])
    return None


def load_assets(tokenizer_dir: Path, generation: dict[str, Any] | None = None,
                stop_ids: list[int] | None = None) -> ChatAssets:
    """Tokenizer, template, special tokens and stop ids (runtime.json's ``stop_token_ids`` when
    the package names them; else the generation config's EOS ids and the tokenizer's EOS)."""
    from tokenizers import Tokenizer

    tok_file = tokenizer_dir / "tokenizer.json"
    if not tok_file.is_file():
        raise PackageError(f"{tokenizer_dir.parent.name}: tokenizer/tokenizer.json is missing")
    try:
        tok = Tokenizer.from_file(str(tok_file))
    except Exception as e:  # tokenizers raises its own Exception type for malformed files
        raise PackageError(f"tokenizer/tokenizer.json cannot be loaded ({e})") from None
    cfg = _json(tokenizer_dir / "tokenizer_config.json")
    template, source = _template(tokenizer_dir, cfg)
    special = {k: s for k in ("bos_token", "eos_token", "pad_token", "unk_token")
               if (s := _token_str(cfg.get(k))) is not None}
    gen = generation if generation is not None else _json(tokenizer_dir / "generation_config.json")
    eos = gen.get("eos_token_id")
    ids = [int(e) for e in (eos if isinstance(eos, list) else [eos]) if isinstance(e, int)]
    if "eos_token" in special and (t := tok.token_to_id(special["eos_token"])) is not None:
        ids.append(int(t))
    if stop_ids:
        ids = [int(i) for i in stop_ids]
    return ChatAssets(tok, template, source, special, tuple(dict.fromkeys(ids)),
                      _json(tokenizer_dir / "preprocessor_config.json"))


def render(assets: ChatAssets, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
    """The chat template rendered as transformers' ``apply_chat_template(tokenize=False)`` does."""
    import datetime

    from jinja2 import TemplateError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise UsageError(f"the chat template refused the prompt: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(x, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    try:
        return env.from_string(assets.template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                       **assets.special)
    except TemplateError as e:
        raise PackageError(f"the chat template ({assets.template_source}) does not render: {e}") from None


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen's resize rule (``transformers...qwen2_vl.image_processing_qwen2_vl.smart_resize``)."""
    if max(height, width) / min(height, width) > 200:
        raise UsageError(f"image {height}x{width}: aspect ratio over 200 (the model's processor refuses it)")
    h = round(height / factor) * factor
    w = round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def pixel_bounds(image_cfg: dict[str, Any]) -> tuple[int, int]:
    size = image_cfg.get("size") or {}
    lo = image_cfg.get("min_pixels") or size.get("shortest_edge") or size.get("min_pixels") or 56 * 56
    hi = image_cfg.get("max_pixels") or size.get("longest_edge") or size.get("max_pixels") or 28 * 28 * 1280
    return int(lo), int(hi)


def load_image(path: Path, vspec: Any, image_cfg: dict[str, Any], max_patches: int | None = None) -> np.ndarray:
    """The file as HxWx3 uint8, resized as the checkpoint's processor would (PIL, its resample)."""
    from PIL import Image

    from pipeline.stage import StageError
    from stages.lib.hostside.vision import open_rgb

    try:
        rgb = open_rgb(path)
    except StageError as e:
        raise UsageError(str(e)) from None
    lo, hi = pixel_bounds(image_cfg)
    if max_patches:  # an engine's profile bounds the patches of one image
        hi = min(hi, max_patches * vspec.patch_size**2)
    h, w = smart_resize(rgb.height, rgb.width, vspec.factor, lo, hi)
    if (h, w) != (rgb.height, rgb.width):
        rgb = rgb.resize((w, h), Image.Resampling(int(image_cfg.get("resample", BICUBIC))))
    return np.asarray(rgb, dtype=np.uint8)


def expand_image_tokens(ids: list[int], image_token_id: int, counts: list[int]) -> list[int]:
    """Each image placeholder -> as many copies as that image has merged tokens, in order."""
    found = sum(1 for t in ids if t == image_token_id)
    if found != len(counts):
        raise UsageError(f"the prompt has {found} image placeholders but {len(counts)} images were given")
    out: list[int] = []
    it = iter(counts)
    for t in ids:
        out += [t] * next(it) if t == image_token_id else [t]
    return out


def build_prompt(assets: ChatAssets, text_spec: Any, vision_spec: Any, images: list[Path], text: str,
                 system: str | None = None, max_patches: int | None = None) -> Prompt:
    """A batch-1 Prompt (ids, mask, pixel values, grids) for ``images`` + ``text``."""
    from stages.lib.hostside.vision import num_image_tokens, preprocess

    if images and vision_spec is None:
        raise UsageError("this package has no vision graph: it cannot take an image")
    content: list[dict[str, Any]] = [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": content}]
    ids = [int(i) for i in assets.tokenizer.encode(render(assets, messages), add_special_tokens=True).ids]
    pv = grid = None
    counts: list[int] = []
    if images:
        share = max_patches // len(images) if max_patches else None  # the profile bounds all images together
        arrays = [load_image(p, vision_spec, assets.image, share) for p in images]
        pv, grid = preprocess(arrays, vision_spec)
        counts = num_image_tokens(vision_spec, grid)
    ids = expand_image_tokens(ids, int(text_spec.image_token_id), counts)
    arr = np.asarray([ids], dtype=np.int64)
    return Prompt(arr, np.ones_like(arr), pixel_values=pv, image_grid_thw=grid)
