"""Everything the decoder export changes inside transformers, in one place.

Each patch is a context manager that restores the original on exit, so the PyTorch reference
the parity check runs afterwards is the unpatched model. ``PATCHED_TARGETS`` lists what is
touched; ``tests/test_patches_text.py`` checks those targets still exist with the behaviour we
rely on, so a transformers upgrade that moves them fails loudly instead of exporting garbage.

What and why:

* **KV cache** -- transformers 5.x passes a ``Cache`` object through the layers. The attention
  modules only call ``past_key_values.update(k, v, layer_idx)`` (and the text model
  ``get_seq_length()`` when no position ids are given), so :class:`FlatKVCache` -- a duck-typed
  cache over flat ``past.N.key/value`` tensors -- is enough, and unlike ``DynamicCache`` it has
  no lazily created 1-D empty tensor for the exporter to trip on when the past length is 0.
* **Attention** (``vlmforge_export`` in ``AttentionInterface``) -- the eager math with the mask add
  and the softmax in FP32: an FP16 ``-inf``/``finfo.min`` mask overflows to ``-inf`` and fully
  masked (left-padding) rows turn to NaN; FP32 keeps them finite.
* **Rotary** -- cos/sin are computed in FP32 but cast to the activation dtype by the model;
  in FP16 that loses ~3 decimal digits at large positions. The patch keeps cos/sin and the
  rotation in FP32 and casts q/k back afterwards.
* **Deepstack** (Qwen3-VL) -- ``_deepstack_process`` scatters through a boolean mask
  (data-dependent shapes). The export passes dense [B, S, H] maps that are zero at non-visual
  positions (see ``hostside/text.scatter_deepstack``) and the patch adds them with a plain Add.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator
from typing import Any

ATTN_NAME = "vlmforge_export"

MODELING_MODULES = {
    "qwen2_vl": "transformers.models.qwen2_vl.modeling_qwen2_vl",
    "qwen2_5_vl": "transformers.models.qwen2_5_vl.modeling_qwen2_5_vl",
    "qwen3_vl": "transformers.models.qwen3_vl.modeling_qwen3_vl",
}
TEXT_MODEL_CLASSES = {
    "qwen2_vl": "Qwen2VLTextModel",
    "qwen2_5_vl": "Qwen2_5_VLTextModel",
    "qwen3_vl": "Qwen3VLTextModel",
}
# (module attribute, why) -- checked by tests/test_patches_text.py on every family.
PATCHED_TARGETS = (
    ("apply_rotary_pos_emb", "replaced by an FP32 rotation"),
    ("rotate_half", "used by the FP32 rotation"),
    ("eager_attention_forward", "the math vlmforge_export reproduces (with an FP32 mask/softmax)"),
)


class FlatKVCache:
    """The part of ``transformers.Cache`` the Qwen-VL text models use, over flat tensors."""

    def __init__(self, past: list[tuple[Any, Any]]):
        self.past = past
        self.present: list[tuple[Any, Any] | None] = [None] * len(past)

    def update(self, key_states: Any, value_states: Any, layer_idx: int, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
        import torch

        pk, pv = self.past[layer_idx]
        k = torch.cat([pk, key_states], dim=-2)
        v = torch.cat([pv, value_states], dim=-2)
        self.present[layer_idx] = (k, v)
        return k, v

    def get_seq_length(self, layer_idx: int = 0) -> Any:
        return self.past[layer_idx][0].shape[-2]


def export_attention(
    module: Any, query: Any, key: Any, value: Any, attention_mask: Any, scaling: float, dropout: float = 0.0, **kwargs: Any
) -> tuple[Any, Any]:
    """Eager attention with the score scale, mask add and softmax in FP32.

    ``attention_mask`` is the additive FP32 [B, 1, S, past+S] mask built by the export wrapper.
    The two matmuls stay in the activation dtype (TensorRT runs them on tensor cores).
    """
    import torch

    groups = module.num_key_value_groups
    if groups > 1:  # repeat_kv: [B, kv, T, D] -> [B, kv*groups, T, D]
        b, kv, t, d = key.shape
        key = key[:, :, None].expand(b, kv, groups, t, d).reshape(b, kv * groups, t, d)
        value = value[:, :, None].expand(b, kv, groups, t, d).reshape(b, kv * groups, t, d)
    scores = torch.matmul(query, key.transpose(2, 3)).float() * scaling
    if attention_mask is not None:
        scores = scores + attention_mask
    probs = torch.softmax(scores, dim=-1).to(query.dtype)
    out = torch.matmul(probs, value).transpose(1, 2).contiguous()
    return out, probs


def _register_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_NAME, export_attention)


def _fp32_rotary(modeling: Any) -> Any:
    rotate_half = modeling.rotate_half

    def apply_rotary_pos_emb(q: Any, k: Any, cos: Any, sin: Any, unsqueeze_dim: int = 1) -> tuple[Any, Any]:
        import torch

        cos = cos.unsqueeze(unsqueeze_dim).to(torch.float32)
        sin = sin.unsqueeze(unsqueeze_dim).to(torch.float32)
        qf, kf = q.to(torch.float32), k.to(torch.float32)
        q_embed = qf * cos + rotate_half(qf) * sin
        k_embed = kf * cos + rotate_half(kf) * sin
        return q_embed.to(q.dtype), k_embed.to(k.dtype)

    return apply_rotary_pos_emb


def _dense_deepstack(self: Any, hidden_states: Any, visual_pos_masks: Any, visual_embeds: Any) -> Any:
    # visual_embeds: [B, S, H], zero at non-visual positions -> identical to the masked add
    return hidden_states + visual_embeds.to(hidden_states.dtype)


@contextlib.contextmanager
def _setattr(obj: Any, name: str, value: Any) -> Iterator[None]:
    # An attribute the object owns (module global, class method, config property) is put back;
    # one it only inherits (a bound method patched on an instance) is deleted again.
    owned = name in getattr(obj, "__dict__", {}) or isinstance(getattr(type(obj), name, None), property)
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        if owned:
            setattr(obj, name, old)
        else:
            delattr(obj, name)


@contextlib.contextmanager
def decoder_export_patches(family: str, text_model: Any, fp32_rotary: bool = True) -> Iterator[None]:
    """Patch ``text_model`` (a ``*TextModel``) and its modeling module for export; undone on exit."""
    import torch

    if family not in MODELING_MODULES:
        raise ValueError(f"unsupported family {family!r}; supported: {', '.join(MODELING_MODULES)}")
    modeling = importlib.import_module(MODELING_MODULES[family])
    for attr, _why in PATCHED_TARGETS:
        if not hasattr(modeling, attr):
            raise RuntimeError(f"{modeling.__name__}.{attr} is gone: transformers changed what the decoder export patches")
    _register_attention()
    rotary = text_model.rotary_emb
    orig_rotary_forward = rotary.forward

    def rotary_fp32(x: Any, position_ids: Any) -> Any:
        # cos/sin are only cast to x.dtype at the end: hand the model an FP32 probe instead
        return orig_rotary_forward(x.new_empty((), dtype=torch.float32), position_ids)

    with contextlib.ExitStack() as stack:
        stack.enter_context(_setattr(text_model.config, "_attn_implementation", ATTN_NAME))
        if fp32_rotary:
            stack.enter_context(_setattr(modeling, "apply_rotary_pos_emb", _fp32_rotary(modeling)))
            stack.enter_context(_setattr(rotary, "forward", rotary_fp32))
        if family == "qwen3_vl":
            cls = getattr(modeling, TEXT_MODEL_CLASSES[family])
            stack.enter_context(_setattr(cls, "_deepstack_process", _dense_deepstack))
        yield
