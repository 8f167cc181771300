"""What each graph under test is fed: the checkpoint's host-side specs and the feeds built from
one held-out sample.

The ONNX graphs, the drill-down and the engines of the verify stage must see the very same
inputs, built the same way the runtime builds them: ``load_specs`` reads what the host side
needs from the checkpoint (the text and vision specs; nothing for a bring-your-own ONNX, no
text side for a CNN), ``vision_feeds`` / ``decoder_feeds`` turn a sample of the ``reference``
stage into a graph's feeds. The decoder gets the *reference* merged embeddings, so its figures
isolate the decoder; ``after`` appends tokens fed after the prompt (teacher forcing).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.stage import StageError


@dataclass
class Specs:
    family: str
    text: Any  # hostside.text.TextSpec
    vision: Any  # hostside.vision.VisionSpec
    config: Any  # the checkpoint's transformers config (None for a bring-your-own ONNX)
    path: Path | None  # None: a bring-your-own ONNX has no checkpoint (and no PyTorch model)


def load_specs(checkpoint: Path, trust_remote_code: bool = False) -> Specs:
    from stages.lib.checkpoints.local import (
        BYO_FAMILY,
        VISION_ONLY_FAMILIES,
        checkpoint_family,
        load_config_hf,
        load_image_processor,
        resolve_checkpoint,
    )
    from stages.lib.hostside.text import TextSpec
    from stages.lib.hostside.vision import VisionSpec

    if checkpoint_family(checkpoint) == BYO_FAMILY:  # the graph takes one preprocessed image
        return Specs(BYO_FAMILY, None, None, None, None)
    path, family = resolve_checkpoint(checkpoint)
    cfg = load_config_hf(path, trust_remote_code)
    if family in VISION_ONLY_FAMILIES:  # a CNN: the graph takes normalised pixels, nothing else
        return Specs(family, None, None, cfg, path)
    proc = load_image_processor(path, trust_remote_code)  # the tokenizer is not needed here
    return Specs(family, TextSpec.from_config(family, cfg), VisionSpec.from_config(family, cfg.vision_config, proc),
                 cfg, path)


def vision_feeds(specs: Specs, sample: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    from stages.lib.hostside.vision import vision_inputs

    if specs.vision is None:  # vision-only CNN: the normalised image is the only input
        return {"pixel_values": sample["pixel_values"]}
    return vision_inputs(specs.vision, sample["pixel_values"], sample["image_grid_thw"])


def decoder_feeds(path: Path, specs: Specs, sample: dict[str, np.ndarray],
                  after: np.ndarray | None = None, past: list[np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Prefill feeds: reference merged embeddings, mask, M-RoPE ids, empty KV, deepstack maps.
    ``after`` [1, n, H]: embeddings of tokens fed after the prompt in the same pass (teacher
    forcing); they get the decode loop's positions and no deepstack (zeros, as decode steps).
    With ``past`` (the prompt's present K/V per layer, as the graph returned them) only ``after``
    is fed, as one chunk read through the cache: what a runtime's decode steps do."""
    from onnx import TensorProto, helper

    from stages.lib.dtypes import ORT_NUMPY
    from stages.lib.hostside import text as host
    from stages.lib.segments.runner import graph_inputs

    inputs = graph_inputs(path)
    if "inputs_embeds" not in {i.name for i in inputs}:
        raise StageError(f"{path.name} has no input 'inputs_embeds'")
    # numpy has no bfloat16: onnx's (ml_dtypes) keeps a BF16 graph's feeds in its own type
    dtypes = {**ORT_NUMPY, "tensor(bfloat16)": helper.tensor_dtype_to_np_dtype(TensorProto.BFLOAT16)}
    embeds, mask, pos = sample["inputs_embeds"], sample["attention_mask"], sample["position_ids"]
    maps = [sample[f"deepstack.{k}"] for k in range(specs.text.deepstack_layers)]
    deep = host.scatter_deepstack(sample["input_ids"], maps, specs.text) if maps else []
    if after is not None and after.shape[1]:
        deltas = sample.get("rope_deltas")
        if deltas is None:  # a held-out set written before rope_deltas were stored
            deltas = host.rope_index(specs.text, sample["input_ids"], sample["image_grid_thw"], None, mask)[1]
        if past is not None:
            seq = embeds.shape[1]
            full_pos, mask = host.continue_position_ids(pos, mask, deltas, int(after.shape[1]))
            return host.prefill_feeds(inputs, after, mask, full_pos[..., seq:], None, past=past, dtypes=dtypes)
        embeds, mask, pos, deep = host.teacher_forced(embeds, mask, pos, deltas, after, deep)
    return host.prefill_feeds(inputs, embeds, mask, pos, deep, dtypes=dtypes)
