"""Tiny random-weight checkpoints of the supported VLM families, saved like real ones.

``save_pretrained`` (safetensors) + a small WordLevel tokenizer with the Qwen special tokens +
the family's image processor, so every stage loads them exactly as a user's local checkpoint.
Weights use a wide initialiser (0.2) so greedy decoding produces varied tokens: a model that
repeats one token proves nothing about parity.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.stage import StageError
from stages.lib.checkpoints.local import VLM_FAMILIES, model_class
from stages.lib.dtypes import torch_dtype

SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)


def tiny_config(family: str, *, vocab_size: int = 512, scale: str = "tiny") -> Any:
    """A small config of the family. ``scale="1b"`` gives a ~1B-parameter one (bench)."""
    import transformers

    big = scale == "1b"
    hidden, layers, heads, kv = (2048, 16, 16, 8) if big else (64, 2, 4, 2)
    inter = 5632 if big else 128
    v_dim, v_depth, v_heads = (1024, 24, 16) if big else (32, 2, 2)
    if family == "qwen3_vl" and not big:
        # every released Qwen3-VL has three deepstack layers ([8, 16, 24] of 27 blocks): keep that
        # layout (three maps, injected after the first three text layers) in the tiny model too
        layers, v_depth = 3, 3
    special = {name: vocab_size - len(SPECIAL_TOKENS) + i for i, name in enumerate(SPECIAL_TOKENS)}
    ids: dict[str, Any] = {
        "image_token_id": special["<|image_pad|>"],
        "video_token_id": special["<|video_pad|>"],
        "vision_start_token_id": special["<|vision_start|>"],
        "vision_end_token_id": special["<|vision_end|>"],
    }
    head_dim = hidden // heads
    # mrope sections (t, h, w) sum to head_dim / 2; the tiny model has head_dim 16 -> 8.
    half = head_dim // 2
    mrope = [half - 2 * (half * 3 // 8), half * 3 // 8, half * 3 // 8]
    text: dict[str, Any] = {
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "max_position_embeddings": 4096,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope},
        "bos_token_id": special["<|endoftext|>"],
        "eos_token_id": special["<|im_end|>"],
        "pad_token_id": special["<|endoftext|>"],
        "initializer_range": 0.02 if big else 0.2,
        "tie_word_embeddings": False,
    }
    vis_common: dict[str, Any] = {"depth": v_depth, "num_heads": v_heads, "in_channels": 3, "spatial_merge_size": 2,
                  "temporal_patch_size": 2, "initializer_range": 0.02 if big else 0.2}
    if family == "qwen2_vl":
        vision: dict[str, Any] = {**vis_common, "embed_dim": v_dim, "hidden_size": hidden, "mlp_ratio": 2, "patch_size": 14}
        return transformers.Qwen2VLConfig(text_config=text, vision_config=vision, **ids)
    if family == "qwen2_5_vl":
        # window_size 56 -> 2x2 merged-token windows: several windows even on small test images.
        vision = {**vis_common, "hidden_size": v_dim, "intermediate_size": 2 * v_dim, "out_hidden_size": hidden,
                  "patch_size": 14, "window_size": 56, "fullatt_block_indexes": [v_depth - 1],
                  "hidden_act": "silu"}
        return transformers.Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids)
    if family == "qwen3_vl":
        text["head_dim"] = head_dim
        text["rope_parameters"]["mrope_interleaved"] = True
        vision = {**vis_common, "hidden_size": v_dim, "intermediate_size": 2 * v_dim, "out_hidden_size": hidden,
                  "patch_size": 16, "num_position_embeddings": 64 if not big else 2304,
                  "deepstack_visual_indexes": [0, 1, 2] if not big else [5, 11, 17]}
        return transformers.Qwen3VLConfig(text_config=text, vision_config=vision, **ids)
    raise StageError(f"cannot generate family {family!r}; supported: {', '.join(VLM_FAMILIES)}")


def tiny_tokenizer(vocab_size: int) -> Any:
    """A WordLevel tokenizer over printable characters and short words, plus Qwen special tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    n_plain = vocab_size - len(SPECIAL_TOKENS)
    words = ["<unk>"] + [chr(c) for c in range(33, 127)]
    syll = [a + b for a in "bcdfghklmnprstvz" for b in "aeiou"]
    words += [w for w in syll + [a + b for a in syll[:40] for b in "nrst"] if w not in words]
    words = words[:n_plain]
    words += [f"w{i}" for i in range(n_plain - len(words))]
    vocab = {w: i for i, w in enumerate(words)}
    vocab.update({tok: n_plain + i for i, tok in enumerate(SPECIAL_TOKENS)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        pad_token="<|endoftext|>",
        eos_token="<|im_end|>",
        additional_special_tokens=list(SPECIAL_TOKENS[1:]),
    )
    return fast


def tiny_image_processor(family: str, merge: int, patch: int) -> Any:
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    factor = patch * merge
    # Small bounds keep the tiny model's sequences short; the stage picks exact sizes itself.
    return Qwen2VLImageProcessorPil(
        min_pixels=(2 * factor) ** 2,
        max_pixels=(16 * factor) ** 2,
        patch_size=patch,
        temporal_patch_size=2,
        merge_size=merge,
    )


def generate_tiny(family: str, out_dir: str | Path, seed: int = 0, scale: str = "tiny", dtype: str = "fp32") -> Path:
    """Write a random-weight checkpoint of ``family`` (plus tokenizer and processor) to ``out_dir``.

    ``scale="1b"`` gives the ~1B-parameter bench configuration; ``dtype="bf16"`` stores it the way
    released Qwen checkpoints are stored (initialised in FP32 first, so seeds give the same values).
    """
    import torch

    if family not in VLM_FAMILIES:
        raise StageError(f"cannot generate family {family!r}; supported: {', '.join(VLM_FAMILIES)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = tiny_config(family, scale=scale)
    torch.manual_seed(seed)
    model = model_class(family)._from_config(cfg, dtype=torch.float32)
    model.eval()
    model.generation_config.do_sample = False
    if dtype != "fp32":
        model.to(torch_dtype(dtype))
    # Shards of ~2 GB for the bench model exercise the sharded-index path of validate_checkpoint.
    model.save_pretrained(out, safe_serialization=True, max_shard_size="2GB")
    tiny_tokenizer(cfg.text_config.vocab_size).save_pretrained(out)
    vc = cfg.vision_config
    proc = tiny_image_processor(family, vc.spatial_merge_size, vc.patch_size)
    proc.save_pretrained(out)
    return out
