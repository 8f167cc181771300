"""Token ids of the prompts the build makes itself: the held-out set (``reference``), calibration
(``qdq/calibset``) and the export parity (``decoder_parity``). Text of a set length, then one image
block with text on both sides. A user's chat prompt is ``runtime/prompt.py``'s (chat template,
one placeholder per image expanded there). Pure python: a device runtime may import it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def text_ids(tokenizer: Any, text: str, n: int, empty: Sequence[int] | None = None) -> list[int]:
    """Exactly ``n`` token ids of ``text`` (no special tokens), repeated when the tokenizer
    merges words into fewer: a prefill of the asked length. ``tokenizer``: a transformers one
    (duck-typed); ``empty``: the ids of a text with none (None: ValueError)."""
    ids = [int(t) for t in tokenizer(text, add_special_tokens=False)["input_ids"]] or list(empty or [])
    if not ids:
        raise ValueError(f"the tokenizer produced no tokens for {text[:60]!r}")
    while len(ids) < n:
        ids += ids
    return ids[:n]


def image_prompt_ids(before: Sequence[int], after: Sequence[int], n_image_tokens: int, tokens: Any) -> list[int]:
    """``before``, one image block (vision start, ``n_image_tokens`` placeholders, vision end),
    ``after``: text on both sides, so the M-RoPE offsets after the image matter. ``tokens``: a
    transformers VL config (``vision_start_token_id``, ``image_token_id``, ``vision_end_token_id``)."""
    image = [tokens.vision_start_token_id, *[tokens.image_token_id] * n_image_tokens, tokens.vision_end_token_id]
    return [*before, *map(int, image), *after]
