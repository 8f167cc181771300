"""Load only the language half of a Qwen-VL checkpoint, streamed tensor by tensor.

``load_model`` (``from_pretrained``) peaks at ~2x the weights when it converts dtypes (measured
on a 1B Qwen2.5-VL, BF16 -> FP16: 4.2 GB peak for 2.1 GB of weights) and holds the ViT the
decoder graph never uses. Here the model is built on the meta device, only the decoder's
tensors (``model.language_model.*``, ``lm_head.*``) are read through
``checkpoints.read_safetensors`` (one reusable read buffer, each tensor converted as it is
read), and the vision tower stays unmaterialised: peak memory is one copy of the decoder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.stage import StageError
from stages.lib.dtypes import torch_dtype

# transformers 5 layout first; original hub checkpoints name the text model "model.*"
_PREFIXES = ("model.language_model.", "lm_head.", "model.embed_tokens.", "model.layers.", "model.norm.")
_HUB_RENAMES = (("model.embed_tokens.", "model.language_model.embed_tokens."),
                ("model.layers.", "model.language_model.layers."),
                ("model.norm.", "model.language_model.norm."))


def _canonical(name: str) -> str:
    for old, new in _HUB_RENAMES:
        if name.startswith(old):
            return new + name[len(old):]
    return name


def load_decoder(path: str | Path, dtype: str = "fp32", trust_remote_code: bool = False) -> Any:
    """The family's ``*ForConditionalGeneration`` with the language model and ``lm_head`` loaded.

    ``model.model.visual`` is None: this object serves the decoder export, not inference.
    """
    import torch

    from stages.lib.checkpoints import (
        detect_family,
        load_config_hf,
        model_class,
        read_safetensors,
        validate_checkpoint,
    )

    path = Path(path)
    family = detect_family(path)
    validate_checkpoint(path)
    tdtype = torch_dtype(dtype)
    config = load_config_hf(path, trust_remote_code)
    config._attn_implementation = "eager"
    with torch.device("meta"):
        model = model_class(family)._from_config(config, dtype=tdtype)
    model.model.visual = None
    state = {_canonical(k): t for k, t in read_safetensors(path, _PREFIXES, tdtype)}
    if "lm_head.weight" not in state and getattr(config, "tie_word_embeddings", False):
        state["lm_head.weight"] = state.get("model.language_model.embed_tokens.weight")
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if not k.startswith("model.visual.")]
    if missing or unexpected:
        raise StageError(f"checkpoint {path}: decoder weights do not match the config "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    # non-persistent buffers (the text rotary's inv_freq) were created on meta: rebuild on CPU
    tm = model.model.language_model
    tm.rotary_emb = type(tm.rotary_emb)(config=tm.config)
    leftover = [n for n, b in model.named_buffers() if b.is_meta]
    if leftover:
        raise StageError(f"cannot materialise decoder buffers {leftover[:3]}")
    return model.eval()
