"""Export-time patches of the transformers vision encoders (the one place they live).

Why a patch: the eager/SDPA vision attention of all three families splits the packed patch
sequence per image with ``torch.split(cu_seqlens.diff().tolist())``, a data-dependent Python
loop that tracing freezes into the sample's image count and sizes. The replacement attends
over the whole sequence with an additive mask built from per-patch segment ids (one image
frame, or one Qwen2.5-VL window, per segment): the same math with no shape baked in, and the
``MatMul -> Add(mask) -> Softmax -> MatMul`` pattern TensorRT fuses into one MHA kernel.

``tests/test_patches.py`` pins the source of every function replaced here: a transformers
upgrade that changes one fails that test until the replacement has been re-checked.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator
from typing import Any

# family -> (module, attention class, block class). The block forwards are not replaced, but
# the replacement relies on them passing **kwargs (our attention_mask) through to attention.
UPSTREAM: dict[str, tuple[str, str, str]] = {
    "qwen2_vl": ("transformers.models.qwen2_vl.modeling_qwen2_vl", "VisionAttention", "Qwen2VLVisionBlock"),
    "qwen2_5_vl": ("transformers.models.qwen2_5_vl.modeling_qwen2_5_vl", "Qwen2_5_VLVisionAttention",
                   "Qwen2_5_VLVisionBlock"),
    "qwen3_vl": ("transformers.models.qwen3_vl.modeling_qwen3_vl", "Qwen3VLVisionAttention", "Qwen3VLVisionBlock"),
}


def upstream_classes(family: str) -> tuple[Any, Any]:
    mod_name, attn, block = UPSTREAM[family]
    mod = importlib.import_module(mod_name)
    return getattr(mod, attn), getattr(mod, block)


def masked_vision_attention(self: Any, hidden_states: Any, cu_seqlens: Any = None,
                            position_embeddings: Any = None, attention_mask: Any = None, **kwargs: Any) -> Any:
    """Replacement ``forward`` of the vision attention: full attention under an additive mask.

    ``attention_mask`` is [1, 1, N, N] FP32 (0 inside a segment, a large negative outside).
    Rotary and softmax run in FP32 (FP16 loses the rotation's accuracy and overflows the
    logits of large ViTs); the two BMMs stay in the export dtype so TensorRT can fuse them.
    """
    import torch

    if attention_mask is None:
        raise RuntimeError("masked_vision_attention needs attention_mask (built from segment ids)")
    n = hidden_states.shape[0]
    dtype = hidden_states.dtype
    q, k, v = self.qkv(hidden_states).reshape(n, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    cos, sin = position_embeddings
    cos, sin = cos.unsqueeze(-2).float(), sin.unsqueeze(-2).float()

    def rot(x: Any) -> Any:
        x = x.float()
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return (x * cos + rotated * sin).to(dtype)

    q, k = rot(q), rot(k)
    q = (q * self.scaling).transpose(0, 1).unsqueeze(0)  # scale before the BMM: smaller FP16 logits
    k = k.transpose(0, 1).unsqueeze(0)
    v = v.transpose(0, 1).unsqueeze(0)
    logits = torch.matmul(q, k.transpose(-1, -2)).float() + attention_mask
    probs = torch.softmax(logits, dim=-1).to(dtype)
    out = torch.matmul(probs, v)  # [1, H, N, D]
    out = out.squeeze(0).transpose(0, 1).reshape(n, -1)
    return self.proj(out)


@contextlib.contextmanager
def patch_vision_attention(family: str) -> Iterator[None]:
    """Swap the family's vision attention ``forward`` for :func:`masked_vision_attention`."""
    attn_cls, _ = upstream_classes(family)
    original = attn_cls.forward
    attn_cls.forward = masked_vision_attention
    try:
        yield
    finally:
        attn_cls.forward = original


def segment_mask(segments: Any) -> Any:
    """[N] segment ids -> [1, 1, N, N] FP32 additive mask (0 same segment, finfo.min otherwise).

    A finite large negative instead of -inf: a row is never fully masked (a patch always
    sees itself), and finite values keep FP16/INT8 builders away from inf arithmetic.
    """
    import torch

    differ = (segments.unsqueeze(0) != segments.unsqueeze(1)).to(torch.float32)
    return (differ * torch.finfo(torch.float32).min).unsqueeze(0).unsqueeze(0)


def _fp32_island() -> type:
    import torch

    class Fp32Island(torch.nn.Module):
        """Runs the wrapped module in FP32 inside a lower-precision graph (cast in, cast back)."""

        def __init__(self, inner: torch.nn.Module):
            super().__init__()
            self.inner = inner.float()

        def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            dtype = x.dtype
            args = tuple(a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args)
            return self.inner(x.float(), *args, **kwargs).to(dtype)

    return Fp32Island


def keep_fp32(visual: Any, fp32_blocks: tuple[int, ...] = ()) -> list[str]:
    """After ``visual.to(fp16/bf16)``: norms and the named blocks back to FP32 islands."""
    import torch

    island = _fp32_island()
    changed: list[str] = []
    for idx in fp32_blocks:
        if not 0 <= idx < len(visual.blocks):
            raise ValueError(f"export.fp32_vision_blocks names block {idx}; the encoder has {len(visual.blocks)}")
        visual.blocks[idx] = island(visual.blocks[idx])
        changed.append(f"blocks.{idx}")
    for name, mod in list(visual.named_modules()):
        for child_name, child in list(mod.named_children()):
            # LayerNorm and the families' RMSNorm classes (their last multiply runs in the input dtype)
            is_norm = isinstance(child, torch.nn.LayerNorm) or type(child).__name__.endswith("RMSNorm")
            if is_norm and not isinstance(mod, island):
                setattr(mod, child_name, island(child))
                changed.append(f"{name}.{child_name}".lstrip("."))
    return changed


def deepstack_taps(visual: Any, family: str) -> list[int]:
    """The blocks whose output a Qwen3-VL deepstack merger reads, in merger order."""
    return list(getattr(visual.config, "deepstack_visual_indexes", ()) or ()) if family == "qwen3_vl" else []


def block_kinds(visual: Any, family: str) -> list[str]:
    """Per block, what its exported graph depends on besides its weights: the mask it attends
    under (Qwen2.5-VL: ``window`` or ``full``) and whether it is an FP32 island."""
    full = set(getattr(visual.config, "fullatt_block_indexes", ()) or ())
    return [("window" if family == "qwen2_5_vl" and i not in full else "full")
            + ("+fp32" if type(blk).__name__ == "Fp32Island" else "") for i, blk in enumerate(visual.blocks)]


def export_module(visual: Any, family: str, blocks: list[int] | None = None) -> Any:
    """An ``nn.Module`` computing the vision features from the host-precomputed inputs.

    It re-composes the upstream encoder's own submodules (patch embed, blocks, mergers) and
    replaces only its forward's data-dependent preamble (position ids, cu_seqlens, window
    index, ``argsort``) with graph inputs (see ``stages.lib.hostside.vision``). Call it under
    :func:`patch_vision_attention`. Outputs: ``image_features`` [N/merge², out_hidden] and for
    Qwen3-VL ``deepstack_features`` [L, N/merge², out_hidden].

    ``blocks``: run only these block indices, in order (a template for ``vision_stamp``, which
    clones the rest); each keeps its own name scope ``visual.blocks.<i>`` and attention kind.
    """
    import torch

    vc = visual.config
    full_blocks = set(getattr(vc, "fullatt_block_indexes", ()) or ()) if family == "qwen2_5_vl" else None
    deepstack = deepstack_taps(visual, family)

    class VisionExport(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.visual = visual

        def forward(self, pixel_values: torch.Tensor, rotary_cos: torch.Tensor, rotary_sin: torch.Tensor,
                    attn_segments: torch.Tensor, *extra: torch.Tensor) -> Any:
            v = self.visual
            h = v.patch_embed(pixel_values)  # casts to the conv weight's dtype itself
            if family == "qwen3_vl":
                index, weight = extra
                pos = (v.pos_embed(index) * weight[:, :, None]).sum(1)  # FP32, as upstream
                h = h + pos.to(h.dtype)
            full = segment_mask(attn_segments)
            window = segment_mask(extra[0]) if family == "qwen2_5_vl" else full
            pe = (rotary_cos, rotary_sin)
            feats = []
            for i in range(len(v.blocks)) if blocks is None else blocks:
                blk = v.blocks[i]
                mask = full if full_blocks is None or i in full_blocks else window
                h = blk(h, cu_seqlens=None, position_embeddings=pe, attention_mask=mask)
                if i in deepstack:
                    feats.append(v.deepstack_merger_list[deepstack.index(i)](h))
            out = v.merger(h)
            if deepstack:
                return out, torch.stack(feats, dim=0)
            return out

    return VisionExport().eval()


def output_names(family: str) -> list[str]:
    return ["image_features", "deepstack_features"] if family == "qwen3_vl" else ["image_features"]
