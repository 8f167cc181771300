"""Host-side helpers for the exported language decoder: pure numpy, no torch at import.

A deployment runtime (and the verify stage) runs the three exported graphs
``vision -> embed -> decoder``; what sits between them lives here:

* :func:`rope_index` -- the 3-D M-RoPE ``position_ids`` [3, B, S] of a multimodal prompt and the
  per-row ``rope_deltas`` [B, 1], the numpy twin of each family's ``get_rope_index``
  (Qwen2-VL, Qwen2.5-VL with ``second_per_grid_ts`` for videos, Qwen3-VL with its per-frame video
  grids). The *interleaving* of the three rows into rotary frequencies (Qwen2 blocks vs Qwen3
  interleaved) happens inside the decoder graph, so the ids themselves are family-agnostic.
* :func:`decode_position_ids` -- positions of the tokens after the prompt (decode steps).
* :func:`merge_image_features` -- the image-feature merge: visual features replace the embeddings
  of the image placeholder tokens, in order (``masked_scatter`` in the model).
* :func:`scatter_deepstack` -- Qwen3-VL deepstack features laid out densely as [B, S, H] (zeros at
  text positions) so the decoder graph adds them with a plain ``Add`` and needs no boolean gather.
* :func:`extend_attention_mask` -- the 2-D mask for the next step.
* :func:`prefill_feeds` -- the decoder graph's feeds, by its declared input names and types;
  :func:`teacher_forced` -- a prompt and the tokens fed after it in one pass.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from stages.lib.dtypes import ORT_NUMPY

TEXT, IMAGE, VIDEO = 0, 1, 2
FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")


@dataclass(frozen=True)
class TextSpec:
    """What the host needs from the checkpoint's config (JSON-able: stored in decoder.json)."""

    family: str
    image_token_id: int
    video_token_id: int
    spatial_merge_size: int
    tokens_per_second: float | None = None  # Qwen2.5-VL video temporal spacing
    deepstack_layers: int = 0  # Qwen3-VL: number of deepstack feature maps the decoder adds

    @staticmethod
    def from_config(family: str, config: Any) -> TextSpec:
        """Build from a transformers ``*VLConfig`` (duck-typed: no transformers import here)."""
        if family not in FAMILIES:
            raise ValueError(f"unsupported family {family!r}; supported: {', '.join(FAMILIES)}")
        vc = config.vision_config
        return TextSpec(
            family=family,
            image_token_id=int(config.image_token_id),
            video_token_id=int(config.video_token_id),
            spatial_merge_size=int(vc.spatial_merge_size),
            tokens_per_second=float(getattr(vc, "tokens_per_second", 0) or 0) or None,
            deepstack_layers=len(getattr(vc, "deepstack_visual_indexes", ()) or ()),
        )

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def mm_token_types(input_ids: np.ndarray, spec: TextSpec) -> np.ndarray:
    """Token types as the processor's ``mm_token_type_ids``: text 0, image 1, video 2."""
    ids = np.asarray(input_ids)
    out = np.zeros(ids.shape, dtype=np.int64)
    out[ids == spec.image_token_id] = IMAGE
    out[ids == spec.video_token_id] = VIDEO
    return out


def _vision_positions(start: int, grid_thw: np.ndarray, merge: int, interval: float) -> np.ndarray:
    t, h, w = (int(grid_thw[0]), int(grid_thw[1]) // merge, int(grid_thw[2]) // merge)
    # float multiply then truncation, as torch's ``(arange * interval).long()``
    pt = (np.arange(t, dtype=np.float64) * interval).astype(np.int64) + start
    ph = np.arange(h, dtype=np.int64) + start
    pw = np.arange(w, dtype=np.int64) + start
    tt, hh, ww = np.meshgrid(pt, ph, pw, indexing="ij")
    return np.stack([tt, hh, ww]).reshape(3, -1)


def rope_index(
    spec: TextSpec,
    input_ids: np.ndarray,
    image_grid_thw: np.ndarray | None = None,
    video_grid_thw: np.ndarray | None = None,
    attention_mask: np.ndarray | None = None,
    second_per_grid_ts: np.ndarray | None = None,
    mm_token_type_ids: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """M-RoPE position ids [3, B, S] (int64) and rope deltas [B, 1] of a (left-padded) prompt.

    Text runs advance all three rows by one per token; an image/video block gets
    (t, h, w) grid positions offset by the running position, after which the running position
    advances by ``max(h, w) / merge``. Padding (``attention_mask == 0``) keeps position 0 and is
    skipped. ``rope_deltas`` = max position + 1 - number of real tokens: decode steps add it
    to their 1-D position (see :func:`decode_position_ids`).
    """
    ids = np.asarray(input_ids)
    types = mm_token_types(ids, spec) if mm_token_type_ids is None else np.asarray(mm_token_type_ids)
    bsz, seq = ids.shape
    merge = spec.spatial_merge_size
    vids = None if video_grid_thw is None else np.asarray(video_grid_thw, dtype=np.int64)
    if spec.family == "qwen3_vl" and vids is not None:
        # Qwen3-VL separates video frames with timestamps: one grid per frame, t = 1
        vids = np.repeat(vids, vids[:, 0], axis=0)
        vids[:, 0] = 1
    grids = {
        IMAGE: iter(np.asarray(image_grid_thw, dtype=np.int64)) if image_grid_thw is not None else iter(()),
        VIDEO: iter(vids) if vids is not None else iter(()),
    }
    secs = iter(np.asarray(second_per_grid_ts, dtype=np.float64)) if second_per_grid_ts is not None else None
    position_ids = np.zeros((3, bsz, seq), dtype=np.int64)
    deltas = np.zeros((bsz, 1), dtype=np.int64)
    for b in range(bsz):
        keep = np.ones(seq, dtype=bool) if attention_mask is None else np.asarray(attention_mask[b]).astype(bool)
        row_types = types[b][keep].tolist()
        parts: list[np.ndarray] = []
        pos = 0
        for kind, grp in itertools.groupby(row_types):
            n = len(list(grp))
            if kind == TEXT:
                parts.append(np.broadcast_to(np.arange(n, dtype=np.int64) + pos, (3, n)))
                pos += n
                continue
            try:
                grid = next(grids[kind])
            except StopIteration:
                raise ValueError(f"row {b}: more {'image' if kind == IMAGE else 'video'} blocks than grids") from None
            interval = 1.0
            if spec.family == "qwen2_5_vl" and kind == VIDEO:
                # Qwen2.5-VL spaces video frames in time; still images have no temporal spacing
                sec = float(next(secs)) if secs is not None else 1.0
                interval = float(spec.tokens_per_second or 1.0) * sec
            block = _vision_positions(pos, grid, merge, interval)
            if block.shape[1] != n:
                raise ValueError(f"row {b}: {n} placeholder tokens but grid {grid.tolist()} gives {block.shape[1]}")
            parts.append(block)
            pos += max(int(grid[1]), int(grid[2])) // merge
        llm = np.concatenate(parts, axis=1) if parts else np.zeros((3, 0), dtype=np.int64)
        position_ids[:, b, keep] = llm
        deltas[b, 0] = (int(llm.max()) + 1 if llm.size else 0) - int(keep.sum())
    return position_ids, deltas


def text_position_ids(attention_mask: np.ndarray) -> np.ndarray:
    """1-D positions of a left-padded batch: ``cumsum(mask) - 1`` (pads get 1, like generate)."""
    m = np.asarray(attention_mask).astype(np.int64)
    pos = np.cumsum(m, axis=-1) - 1
    return np.where(m == 0, 1, pos)


def decode_position_ids(attention_mask: np.ndarray, rope_deltas: np.ndarray, seq_len: int) -> np.ndarray:
    """Positions [3, B, seq_len] of the last ``seq_len`` tokens of ``attention_mask`` [B, past + seq_len].

    After the prompt all three M-RoPE rows advance together: text position + ``rope_deltas``.
    """
    pos = text_position_ids(attention_mask)[:, -seq_len:] + np.asarray(rope_deltas, dtype=np.int64).reshape(-1, 1)
    return np.broadcast_to(pos[None], (3, *pos.shape)).copy()


def extend_attention_mask(attention_mask: np.ndarray, n: int = 1) -> np.ndarray:
    """The 2-D mask [B, past + n] after appending ``n`` real tokens."""
    m = np.asarray(attention_mask)
    return np.concatenate([m, np.ones((m.shape[0], n), dtype=m.dtype)], axis=1)


def _placeholder_mask(input_ids: np.ndarray, token_id: int, n_features: int) -> np.ndarray:
    mask = np.asarray(input_ids) == token_id
    if int(mask.sum()) != n_features:
        raise ValueError(f"{int(mask.sum())} placeholder tokens (id {token_id}) but {n_features} feature rows")
    return mask


def merge_image_features(
    inputs_embeds: np.ndarray, input_ids: np.ndarray, features: np.ndarray, token_id: int
) -> np.ndarray:
    """Replace the embeddings of the placeholder tokens by ``features`` [N, H], in row-major order.

    The model's ``masked_scatter``: the i-th placeholder (batch-major, then sequence) takes the
    i-th feature row, so images concatenated in prompt order line up with their placeholders.
    """
    out = np.array(inputs_embeds, copy=True)
    mask = _placeholder_mask(input_ids, token_id, features.shape[0])
    out[mask] = features.astype(out.dtype, copy=False)
    return out


def visual_mask(input_ids: np.ndarray, spec: TextSpec) -> np.ndarray:
    ids = np.asarray(input_ids)
    return (ids == spec.image_token_id) | (ids == spec.video_token_id)


def scatter_deepstack(
    input_ids: np.ndarray, features: list[np.ndarray], spec: TextSpec, dtype: Any = np.float32
) -> list[np.ndarray]:
    """Qwen3-VL deepstack maps [N_visual, H] -> dense [B, S, H] with zeros at non-visual positions.

    The model adds deepstack map k to the hidden states at the visual positions after decoder
    layer k; adding a dense tensor that is zero elsewhere is the same sum (x + 0 == x exactly) and
    keeps the graph free of data-dependent indexing. Decode steps pass zeros.
    """
    mask = visual_mask(input_ids, spec)
    return [_scatter(mask, f, dtype) for f in features]


def _scatter(mask: np.ndarray, f: np.ndarray, dtype: Any) -> np.ndarray:
    dense = np.zeros((*mask.shape, f.shape[-1]), dtype=dtype)
    if int(mask.sum()) != f.shape[0]:
        raise ValueError(f"{int(mask.sum())} visual tokens but a deepstack map of {f.shape[0]} rows")
    dense[mask] = f.astype(dtype, copy=False)
    return dense


def zeros_deepstack(spec: TextSpec, batch: int, seq: int, hidden: int, dtype: Any = np.float32) -> list[np.ndarray]:
    """Deepstack inputs for steps without visual tokens (decode, text-only prompts)."""
    return [np.zeros((batch, seq, hidden), dtype=dtype) for _ in range(spec.deepstack_layers)]


def continue_position_ids(
    position_ids: np.ndarray, attention_mask: np.ndarray, rope_deltas: np.ndarray, n: int
) -> tuple[np.ndarray, np.ndarray]:
    """Positions [3, B, S + n] and mask [B, S + n] of a prompt followed by ``n`` generated tokens
    fed in one pass (teacher forcing): the prompt's M-RoPE ids, then for each token the position
    the decode loop gives it (:func:`decode_position_ids` over the extended mask)."""
    if n == 0:  # decode_position_ids(..., 0) would slice [-0:], i.e. the whole row
        return np.asarray(position_ids, dtype=np.int64), np.asarray(attention_mask)
    mask = extend_attention_mask(attention_mask, n)
    tail = decode_position_ids(mask, rope_deltas, n)
    return np.concatenate([np.asarray(position_ids, dtype=np.int64), tail], axis=-1), mask


def teacher_forced(
    embeds: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray, rope_deltas: np.ndarray,
    tail: np.ndarray, deepstack: Sequence[np.ndarray] = (),
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[np.ndarray]]:
    """A prompt followed by ``tail`` [B, n, H] (embeddings of the tokens after it) in one pass:
    (embeds, mask, position_ids, dense deepstack maps). Causal attention leaves the prompt's
    logits as they were; the tail gets the decode loop's positions and no deepstack (zeros, as
    decode steps)."""
    n = int(tail.shape[1])
    pos, mask = continue_position_ids(position_ids, attention_mask, rope_deltas, n)
    emb = np.concatenate([embeds, tail.astype(embeds.dtype, copy=False)], axis=1)
    deep = [np.concatenate([d, np.zeros((*d.shape[:-2], n, d.shape[-1]), d.dtype)], axis=-2) for d in deepstack]
    return emb, mask, pos, deep


PAST, DEEPSTACK = "past_key_values.", "deepstack_embeds."


def prefill_feeds(
    inputs: Iterable[Any], embeds: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
    deepstack: Sequence[np.ndarray] | None = None, visual_mask: np.ndarray | None = None,
    past: Sequence[np.ndarray] | None = None, dtypes: Mapping[str, Any] = ORT_NUMPY,
) -> dict[str, np.ndarray]:
    """The decoder graph's feeds for one call, each in the type the graph declares (ORT refuses a
    feed of another dtype: an FP16 graph takes FP16 embeddings, past and deepstack maps).

    ``inputs``: the graph's, as ``session.get_inputs()`` or ``segments.graph_inputs`` list them
    (name, ORT type string, shape); ``dtypes``: type string -> numpy (unmapped: the array's own).
    Embeddings, mask and positions are always fed. ``past_key_values.i.key|value``: ``past``
    [key, value] per layer; None: empty, (B, kv_heads, 0, head_dim), a prefill.
    ``deepstack_embeds.k`` (Qwen3-VL): ``deepstack`` maps dense [B, S, H], or compact [N_visual, H]
    scattered to ``visual_mask`` [B, S]; none: zeros (decode steps, text-only prompts); fewer maps
    than inputs: ValueError. Other names are left out: the caller decides if that is an error.
    """
    ins = list(inputs)
    want = {a.name: dtypes.get(str(a.type)) for a in ins}

    def typed(name: str, x: np.ndarray) -> np.ndarray:
        dt = want.get(name)
        return x if dt is None else np.asarray(x).astype(dt, copy=False)

    feeds = {"inputs_embeds": typed("inputs_embeds", embeds), "attention_mask": typed("attention_mask", attention_mask),
             "position_ids": typed("position_ids", position_ids)}
    b, s, h = embeds.shape
    n_deep = sum(1 for a in ins if a.name.startswith(DEEPSTACK))
    if deepstack and len(deepstack) < n_deep:  # more are left unfed: a graph exported without them
        raise ValueError(f"the decoder takes {n_deep} deepstack maps, {len(deepstack)} were given")
    for a in ins:
        dt = want[a.name] or feeds["inputs_embeds"].dtype
        if a.name.startswith(PAST):
            if past is None:
                kv = [d if isinstance(d, int) else 0 for d in a.shape]  # symbolic dims: batch and past
                feeds[a.name] = np.zeros((b, kv[1], 0, kv[3]), dtype=dt)
            else:
                layer, kind = a.name[len(PAST):].split(".")
                feeds[a.name] = typed(a.name, past[2 * int(layer) + (kind == "value")])
        elif a.name.startswith(DEEPSTACK):
            if not deepstack:
                feeds[a.name] = np.zeros((b, s, h), dtype=dt)
            else:
                m = deepstack[int(a.name[len(DEEPSTACK):])]
                feeds[a.name] = _scatter(visual_mask, m, dt) if visual_mask is not None else typed(a.name, m)
    return feeds

