"""Random-weight checkpoints with the released Qwen-VL configurations, written tensor by tensor.

The models users ship are 3-8 B parameters; no hub download is possible here, so scale is
measured on checkpoints with the released widths, vocabularies and layouts (the released
``config.json`` values below), random BF16 weights, sharded like the released ones. A model of
that size cannot be instantiated to call ``save_pretrained`` (8 B in FP32 is 32 GB): the
parameter names and shapes come from the model built on the meta device, and each shard is
filled and written on its own, so peak memory is one shard (``SHARD_BYTES``).

``text_layers`` / ``vision_blocks`` shorten a model to measure the same widths at lower depth;
the Qwen3-VL deepstack indexes are rescaled so the released three-layer layout survives.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.stage import StageError

__all__ = ["RELEASED", "SHARD_BYTES", "released_config", "weight_bytes", "write_random_checkpoint"]

# The ChatML template released Qwen-VL checkpoints ship (chat_template.jinja; images as
# <|vision_start|><|image_pad|><|vision_end|>): tools that read a checkpoint expect one.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SHARD_BYTES = 2 * 1024**3  # released Qwen-VL checkpoints ship ~4-5 GB shards; 2 GB keeps peak RSS low

# The released config.json values that set graph shapes (hub: Qwen/<name>-Instruct).
RELEASED: dict[str, dict[str, Any]] = {
    "qwen2.5-vl-3b": {
        "family": "qwen2_5_vl",
        "text": {"hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36, "num_attention_heads": 16,
                 "num_key_value_heads": 2, "vocab_size": 151936, "rope_theta": 1000000.0, "mrope_section": [16, 24, 24],
                 "tie_word_embeddings": True},
        "vision": {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16, "patch_size": 14,
                   "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31], "hidden_act": "silu"},
    },
    "qwen2.5-vl-7b": {
        "family": "qwen2_5_vl",
        "text": {"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
                 "num_key_value_heads": 4, "vocab_size": 152064, "rope_theta": 1000000.0, "mrope_section": [16, 24, 24],
                 "tie_word_embeddings": False},
        "vision": {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16, "patch_size": 14,
                   "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31], "hidden_act": "silu"},
    },
    "qwen3-vl-4b": {
        "family": "qwen3_vl",
        "text": {"hidden_size": 2560, "intermediate_size": 9728, "num_hidden_layers": 36, "num_attention_heads": 32,
                 "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936, "rope_theta": 5000000.0,
                 "mrope_section": [24, 20, 20], "tie_word_embeddings": True},
        "vision": {"depth": 24, "hidden_size": 1024, "intermediate_size": 4096, "num_heads": 16, "patch_size": 16,
                   "num_position_embeddings": 2304, "deepstack_visual_indexes": [5, 11, 17],
                   "hidden_act": "gelu_pytorch_tanh"},
    },
    "qwen3-vl-8b": {
        "family": "qwen3_vl",
        "text": {"hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 36, "num_attention_heads": 32,
                 "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936, "rope_theta": 5000000.0,
                 "mrope_section": [24, 20, 20], "tie_word_embeddings": False},
        "vision": {"depth": 27, "hidden_size": 1152, "intermediate_size": 4304, "num_heads": 16, "patch_size": 16,
                   "num_position_embeddings": 2304, "deepstack_visual_indexes": [8, 16, 24],
                   "hidden_act": "gelu_pytorch_tanh"},
    },
}


def released_config(name: str, text_layers: int | None = None, vision_blocks: int | None = None,
                    widths: dict[str, dict[str, Any]] | None = None) -> Any:
    """The transformers config of a released model, optionally with fewer text layers / vision
    blocks, and with ``widths`` ({"text": {...}, "vision": {...}} config values) replacing its
    widths: the released layout at another size (a deep, narrow model for export-time benches)."""
    import transformers

    from stages.lib.checkpoints.tiny import SPECIAL_TOKENS

    if name not in RELEASED:
        raise StageError(f"unknown released model {name!r}; known: {', '.join(RELEASED)}")
    spec = RELEASED[name]
    t = {**spec["text"], **(widths or {}).get("text", {})}
    v = {**spec["vision"], **(widths or {}).get("vision", {})}
    depth = int(vision_blocks or v["depth"])
    if depth > v["depth"] or (text_layers or 1) > t["num_hidden_layers"]:
        raise StageError(f"{name}: at most {t['num_hidden_layers']} text layers and {v['depth']} vision blocks")
    if "fullatt_block_indexes" in v:  # every 8th block attends globally; keep at least the last one
        v["fullatt_block_indexes"] = [i for i in v["fullatt_block_indexes"] if i < depth] or [depth - 1]
    if "deepstack_visual_indexes" in v:  # same relative positions, always three (the released layout)
        full = v["depth"]
        idx = [min(depth - 1, round(i * depth / full)) for i in v["deepstack_visual_indexes"]]
        if len(set(idx)) < 3:  # too shallow to spread them: the last three blocks
            idx = [depth - 3, depth - 2, depth - 1]
        if min(idx) < 0:
            raise StageError(f"{name}: {depth} vision blocks cannot hold three deepstack layers (need >= 3)")
        v["deepstack_visual_indexes"] = idx
    v["depth"] = depth
    t["num_hidden_layers"] = int(text_layers or t["num_hidden_layers"])
    vocab = int(t["vocab_size"])
    # the generated tokenizer puts the Qwen special tokens at the top of the vocabulary
    special = {tok: vocab - len(SPECIAL_TOKENS) + i for i, tok in enumerate(SPECIAL_TOKENS)}
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": t.pop("rope_theta"), "mrope_section": t.pop("mrope_section")}
    if spec["family"] == "qwen3_vl":
        rope["mrope_interleaved"] = True
    tie = t.pop("tie_word_embeddings")
    text = {**t, "rope_parameters": rope, "max_position_embeddings": 128000, "rms_norm_eps": 1e-6,
            "bos_token_id": special["<|endoftext|>"], "eos_token_id": special["<|im_end|>"],
            "pad_token_id": special["<|endoftext|>"], "tie_word_embeddings": tie, "hidden_act": "silu"}
    vision = {**v, "in_channels": 3, "spatial_merge_size": 2, "temporal_patch_size": 2,
              "out_hidden_size": t["hidden_size"]}
    ids = {"image_token_id": special["<|image_pad|>"], "video_token_id": special["<|video_pad|>"],
           "vision_start_token_id": special["<|vision_start|>"], "vision_end_token_id": special["<|vision_end|>"],
           "tie_word_embeddings": tie}
    if spec["family"] == "qwen2_5_vl":
        vision["tokens_per_second"] = 2
        return transformers.Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids)
    return transformers.Qwen3VLConfig(text_config=text, vision_config=vision, **ids)


def _shapes(config: Any, family: str) -> list[tuple[str, tuple[int, ...]]]:
    """Every persistent tensor the model saves, with its shape (built on meta: no memory)."""
    import torch

    from stages.lib.checkpoints.local import model_class

    with torch.device("meta"):
        model = model_class(family)._from_config(config, dtype=torch.bfloat16)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    return [(k, tuple(t.shape)) for k, t in model.state_dict().items() if not (tied and k == "lm_head.weight")]


def weight_bytes(config: Any, family: str) -> int:
    import math

    return sum(2 * math.prod(s) for _, s in _shapes(config, family))


def _fill(name: str, shape: tuple[int, ...], gen: Any) -> Any:
    """One BF16 tensor: norms near 1, biases near 0, matrices N(0, 0.02) like the initialiser."""
    import torch

    t = torch.empty(shape, dtype=torch.float32)
    scale_like = len(shape) == 1 and name.endswith(".weight") and ("norm" in name.rsplit(".", 2)[-2] or ".ln_" in name)
    t.normal_(1.0 if scale_like else 0.0, 0.02, generator=gen)
    return t.to(torch.bfloat16)


def write_random_checkpoint(name: str, out_dir: Path, text_layers: int | None = None,
                            vision_blocks: int | None = None, seed: int = 0, report: Any = None,
                            widths: dict[str, dict[str, Any]] | None = None) -> Path:
    """Write ``config.json``, sharded BF16 safetensors + index, tokenizer and processor to ``out_dir``.

    Written into ``<out_dir>.partial`` and renamed when complete, so an interrupted run never
    leaves a folder that looks like a whole checkpoint.
    """
    import os
    import shutil

    import torch
    from safetensors.torch import save_file

    from stages.lib.checkpoints.tiny import tiny_image_processor, tiny_tokenizer

    out_dir = Path(out_dir)
    if (out_dir / "model.safetensors.index.json").is_file():
        return out_dir
    family = RELEASED[name]["family"]
    config = released_config(name, text_layers, vision_blocks, widths)
    shapes = _shapes(config, family)
    tmp = out_dir.with_name(out_dir.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)  # our own half-written folder from an interrupted run
    tmp.mkdir(parents=True)
    gen = torch.Generator().manual_seed(seed)
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for key, shape in shapes:
        nbytes = 2 * int(torch.Size(shape).numel())
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append((key, shape))
        size += nbytes
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        if report:
            report(f"writing {fname} ({len(shard)} tensors)", i / len(shards))
        tensors = {key: _fill(key, shape, gen) for key, shape in shard}
        total += sum(t.numel() * 2 for t in tensors.values())
        save_file(tensors, str(tmp / fname), metadata={"format": "pt"})
        del tensors
        weight_map.update({key: fname for key, _ in shard})
    (tmp / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    config.dtype = "bfloat16"
    config.save_pretrained(tmp)
    from transformers import GenerationConfig

    GenerationConfig(do_sample=False, bos_token_id=config.text_config.bos_token_id,
                     eos_token_id=config.text_config.eos_token_id,
                     pad_token_id=config.text_config.pad_token_id).save_pretrained(tmp)
    tiny_tokenizer(config.text_config.vocab_size).save_pretrained(tmp)
    (tmp / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    vc = config.vision_config
    tiny_image_processor(family, vc.spatial_merge_size, vc.patch_size).save_pretrained(tmp)
    os.replace(tmp, out_dir)
    return out_dir
