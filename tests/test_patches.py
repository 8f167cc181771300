"""Fails loudly when a transformers upgrade changes what the vision export patches or re-composes.

``stages/lib/patches/vision.py`` replaces the vision attention ``forward`` and re-composes each
encoder's ``forward`` from its submodules with host-precomputed inputs. Both are only right for
the upstream code they were written against: the source of every such function is pinned
here. When this fails, re-read the new upstream code, adjust the patch (or the hostside
helpers), check parity (tests/test_export_vision.py) and update the hash.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect

import pytest

from stages.lib.checkpoints.local import VISION_CLASSES
from stages.lib.patches import vision as pv

ATTENTION = "2afc2f9fa3ebd677"  # the same source in all three families
BLOCK = {"qwen2_vl": "c68a8532e7df1519", "qwen2_5_vl": "681e62f9206787af", "qwen3_vl": "681e62f9206787af"}
ENCODER = {"qwen2_vl": "4e3008c99d30062b", "qwen2_5_vl": "76f11f57da441812", "qwen3_vl": "aaadd4d83fb22c27"}
VISION_UTILS = {  # hostside/vision.py mirrors these in numpy
    "get_vision_position_ids": "8ac4d99395f31a6d",
    "get_vision_window_index": "e63401aa8d17c007",
    "get_vision_interpolation_indices_and_weights": "f8bf49950ce4280d",
    "get_vision_cu_seqlens": "efc6af7d177a041f",
}


def _hash(fn: object) -> str:
    return hashlib.sha256(inspect.getsource(fn).encode()).hexdigest()[:16]  # type: ignore[arg-type]


@pytest.mark.parametrize("family", sorted(pv.UPSTREAM))
def test_patched_attention_source_unchanged(family: str) -> None:
    attn, block = pv.upstream_classes(family)
    assert _hash(attn.forward) == ATTENTION, f"{attn.__qualname__}.forward changed upstream: re-check the patch"
    assert _hash(block.forward) == BLOCK[family], f"{block.__qualname__}.forward changed upstream"


@pytest.mark.parametrize("family", sorted(VISION_CLASSES))
def test_recomposed_encoder_source_unchanged(family: str) -> None:
    mod, cls = VISION_CLASSES[family]
    enc = getattr(importlib.import_module(mod), cls)
    assert _hash(enc.forward) == ENCODER[family], f"{cls}.forward changed upstream: re-check export_module"


def test_vision_utils_unchanged() -> None:
    import transformers.vision_utils as vu

    for name, want in VISION_UTILS.items():
        assert _hash(getattr(vu, name)) == want, f"transformers.vision_utils.{name} changed: re-check hostside/vision"


@pytest.mark.parametrize("family", sorted(pv.UPSTREAM))
def test_attributes_the_patch_uses_exist(family: str) -> None:
    """The replacement reads qkv/proj/num_heads/scaling and the block passes **kwargs on."""
    from stages.lib.checkpoints.tiny import tiny_config

    attn_cls, block_cls = pv.upstream_classes(family)
    cfg = tiny_config(family).vision_config
    attn = attn_cls(cfg)
    for name in ("qkv", "proj", "num_heads", "scaling"):
        assert hasattr(attn, name), f"{attn_cls.__qualname__} has no {name}"
    params = inspect.signature(block_cls.forward).parameters
    assert any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def test_patch_is_restored_on_exit() -> None:
    attn_cls, _ = pv.upstream_classes("qwen2_vl")
    original = attn_cls.forward
    with pv.patch_vision_attention("qwen2_vl"):
        assert attn_cls.forward is pv.masked_vision_attention
    assert attn_cls.forward is original
    with pytest.raises(RuntimeError), pv.patch_vision_attention("qwen2_vl"):
        raise RuntimeError("boom")
    assert attn_cls.forward is original


def test_segment_mask() -> None:
    import torch

    m = pv.segment_mask(torch.tensor([0, 0, 1, 1, 1]))
    assert m.shape == (1, 1, 5, 5) and m.dtype == torch.float32
    assert m[0, 0, 0, 1] == 0 and m[0, 0, 0, 2] < -1e30 and m[0, 0, 4, 2] == 0
