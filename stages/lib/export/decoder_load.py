"""Load only the language half of a Qwen-VL checkpoint, streamed tensor by tensor.

``load_model`` (``from_pretrained``) peaks at ~2x the weights when it converts dtypes (measured
on a 1B Qwen2.5-VL, BF16 -> FP16: 4.2 GB peak for 2.1 GB of weights) and holds the ViT the
decoder graph never uses. Here the model is built on the meta device, only the decoder's
tensors (``model.language_model.*``, ``lm_head.*``) are read through
``checkpoints.read_safetensors`` (one reusable read buffer, each tensor converted as it is
read), and the vision tower stays unmaterialised: peak memory is one copy of the decoder.

``layers=K`` builds and reads only the first K text layers (the stamped export's template,
``decoder_stamp``); ``template_decoder`` builds that K-layer decoder with random values instead
of the checkpoint's, so that every parameter's initializer in the traced graph is unambiguous.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from pipeline.stage import StageError
from stages.lib.dtypes import torch_dtype

# transformers 5 layout first; original hub checkpoints name the text model "model.*"
_PREFIXES = ("model.language_model.", "lm_head.", "model.embed_tokens.", "model.layers.", "model.norm.")
_HUB_RENAMES = (("model.embed_tokens.", "model.language_model.embed_tokens."),
                ("model.layers.", "model.language_model.layers."),
                ("model.norm.", "model.language_model.norm."))
_LAYER = re.compile(r"^model\.language_model\.layers\.(\d+)\.")


def _canonical(name: str) -> str:
    for old, new in _HUB_RENAMES:
        if name.startswith(old):
            return new + name[len(old):]
    return name


def _meta_model(path: Path, dtype: str, trust_remote_code: bool, layers: int | None,
                vocab: int | None = None) -> tuple[Any, Any]:
    """(model on the meta device with the vision tower dropped, its config)."""
    import torch

    from stages.lib.checkpoints.local import detect_family, load_config_hf, model_class, validate_checkpoint

    family = detect_family(path)
    validate_checkpoint(path)
    config = load_config_hf(path, trust_remote_code)
    config._attn_implementation = "eager"
    tc = config.text_config
    if layers is not None and layers < tc.num_hidden_layers:
        tc.num_hidden_layers = layers
        if getattr(tc, "layer_types", None):  # one entry per layer: the layers index it
            tc.layer_types = list(tc.layer_types)[:layers]
    if vocab is not None:
        tc.vocab_size = vocab
        if getattr(tc, "pad_token_id", None) is not None and tc.pad_token_id >= vocab:
            tc.pad_token_id = None  # the padding row index only matters to the embedding's gradient
    with torch.device("meta"):
        model = model_class(family)._from_config(config, dtype=torch_dtype(dtype))
    model.model.visual = None
    return model, config


def _materialise(model: Any, config: Any, state: dict[str, Any], path: Path) -> Any:
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


def load_decoder(path: str | Path, dtype: str = "fp32", trust_remote_code: bool = False,
                 layers: int | None = None) -> Any:
    """The family's ``*ForConditionalGeneration`` with the language model and ``lm_head`` loaded.

    ``model.model.visual`` is None: this object serves the decoder export, not inference.
    ``layers``: build and read only the first that many text layers (embed, norm, lm_head whole).
    """
    from stages.lib.checkpoints.local import read_safetensors

    path = Path(path)
    model, config = _meta_model(path, dtype, trust_remote_code, layers)
    n = int(config.text_config.num_hidden_layers)
    state = {}
    for k, t in read_safetensors(path, _PREFIXES, torch_dtype(dtype)):
        name = _canonical(k)
        m = _LAYER.match(name)
        if m is None or int(m.group(1)) < n:  # tensors of the layers past the limit are dropped
            state[name] = t
    return _materialise(model, config, state, path)


def template_decoder(path: str | Path, dtype: str, layers: int, vocab: int | None = None,
                     seed: int = 0, trust_remote_code: bool = False) -> Any:
    """The first ``layers`` text layers of the checkpoint's decoder, with random parameters.

    Nothing but config.json is read. Every parameter gets its own random values so that the
    exporter's optimiser cannot merge two of them (it deduplicates equal initializers, and a
    random checkpoint's all-ones norms or zero biases are equal across layers): each
    initializer of the traced graph is then one parameter, or its folded transpose. ``vocab``
    shrinks the embedding and ``lm_head`` (the vocab only sizes the last MatMul; the real
    table is bound afterwards).
    """
    import torch

    path = Path(path)
    model, config = _meta_model(path, dtype, trust_remote_code, layers, vocab)
    g = torch.Generator().manual_seed(seed)
    tdtype = torch_dtype(dtype)
    state = {name: torch.randn(p.shape, generator=g).to(tdtype)
             for name, p in model.named_parameters() if not name.startswith("model.visual.")}
    return _materialise(model, config, state, path)
