"""Greedy multimodal generation through the exported graphs (onnxruntime) and through PyTorch.

``OrtPipeline`` runs ``vision.onnx`` (optional) -> ``embed.onnx`` -> host merge
(``hostside/text.py``) -> ``decoder.onnx`` prefill -> decode loop with the KV cache. It is what
the export parity and the verify stage call, and what a deployment runtime would do:

    pipe = OrtPipeline.from_folder(export_decoder_dir, vision_dir=export_vision_dir)
    prompt = Prompt(input_ids, attention_mask, pixel_values=pv, image_grid_thw=grid)
    tokens = pipe.generate(prompt, max_new_tokens=16)   # [B, 16] int64

``torch_generate`` is the reference: ``model.generate`` on the same prompt, greedy, no EOS stop.
No torch import at module level (a runtime needs only numpy + onnxruntime).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stages.lib.dtypes import ORT_FLOATS, ORT_NUMPY
from stages.lib.hostside import text as host
from stages.lib.ortsession import Optimization, ort_session


@dataclass
class Prompt:
    """A tokenised (left-padded) multimodal prompt, as the processor returns it (numpy)."""

    input_ids: np.ndarray  # [B, S] int64
    attention_mask: np.ndarray | None = None  # [B, S]
    pixel_values: np.ndarray | None = None  # [N_patches, patch_dim] (run through vision.onnx)
    image_grid_thw: np.ndarray | None = None  # [n_images, 3]
    # Precomputed visual features instead of pixel_values (e.g. from the PyTorch vision tower).
    image_features: np.ndarray | None = None  # [N_tokens, H]
    deepstack_features: list[np.ndarray] | None = None  # Qwen3-VL: [N_tokens, H] per deepstack layer

    def mask(self) -> np.ndarray:
        if self.attention_mask is None:
            return np.ones(self.input_ids.shape, dtype=np.int64)
        return np.asarray(self.attention_mask, dtype=np.int64)


class OrtPipeline:
    def __init__(
        self,
        decoder_path: str | Path,
        embed_path: str | Path,
        spec: host.TextSpec,
        vision_path: str | Path | None = None,
        vision_spec: Any = None,
        providers: tuple[str, ...] = ("CPUExecutionProvider",),
        optimization: Optimization = "all",  # "none" for Q/DQ graphs (ORT's fusions reject FP8)
    ):
        opts: dict[str, Any] = {"providers": providers, "optimization": optimization, "log_level": 3}
        self._bind(ort_session(Path(decoder_path), **opts), ort_session(Path(embed_path), **opts), spec,
                   ort_session(Path(vision_path), **opts) if vision_path else None, vision_spec)

    @classmethod
    def from_sessions(cls, decoder: Any, embed: Any, spec: host.TextSpec, vision: Any = None,
                      vision_spec: Any = None) -> OrtPipeline:
        """Over sessions already open: any backend with onnxruntime's ``get_inputs``/``run``
        interface (the device runtime's TensorRT sessions)."""
        pipe = cls.__new__(cls)
        pipe._bind(decoder, embed, spec, vision, vision_spec)
        return pipe

    def _bind(self, decoder: Any, embed: Any, spec: host.TextSpec, vision: Any, vision_spec: Any) -> None:
        """Keep the sessions and read the decoder's facts from its inputs (dtype, widths, KV)."""
        self.spec, self.decoder, self.embed, self.vision, self.vision_spec = spec, decoder, embed, vision, vision_spec
        self.inputs = list(self.decoder.get_inputs())
        ins = {i.name: i for i in self.inputs}
        self.dtype = ORT_FLOATS[ins["inputs_embeds"].type]
        self.hidden = int(ins["inputs_embeds"].shape[-1])
        self.n_layers = sum(1 for n in ins if n.startswith("past_key_values.") and n.endswith(".key"))
        k0 = ins["past_key_values.0.key"].shape
        self.kv_heads, self.head_dim = int(k0[1]), int(k0[3])

    @staticmethod
    def from_folder(decoder_dir: str | Path, vision_dir: str | Path | None = None, **kw: Any) -> OrtPipeline:
        """From an ``export_decoder`` output folder (and optionally an ``export_vision`` one)."""
        d = Path(decoder_dir)
        meta = json.loads((d / "decoder.json").read_text())
        spec = host.TextSpec(**meta["host"])
        vision_path = vision_spec = None
        if vision_dir is not None:
            from stages.lib.hostside.vision import VisionSpec

            vmeta = json.loads((Path(vision_dir) / "vision.json").read_text())
            vision_path = Path(vision_dir) / "vision.onnx"
            vision_spec = VisionSpec.from_dict(vmeta["spec"])
        return OrtPipeline(d / "decoder.onnx", d / "embed.onnx", spec, vision_path, vision_spec, **kw)

    # --- pieces ---------------------------------------------------------------------------

    def visual_features(self, prompt: Prompt) -> tuple[np.ndarray | None, list[np.ndarray]]:
        if prompt.image_features is not None:
            return prompt.image_features, list(prompt.deepstack_features or [])
        if prompt.pixel_values is None:
            return None, []
        if self.vision is None:
            raise ValueError("prompt has pixel_values but the pipeline has no vision graph")
        from stages.lib.hostside.vision import vision_inputs

        feeds = vision_inputs(self.vision_spec, prompt.pixel_values, prompt.image_grid_thw)
        types = {i.name: i.type for i in self.vision.get_inputs()}
        # float inputs in the graph's own dtype (an FP16 graph takes FP16 pixels)
        feeds = {k: v.astype(ORT_FLOATS[types[k]], copy=False) if types[k] in ORT_FLOATS else v
                 for k, v in feeds.items() if k in types}
        outs = dict(zip([o.name for o in self.vision.get_outputs()], self.vision.run(None, feeds), strict=True))
        # export_vision writes Qwen3-VL deepstack maps stacked: [n_deepstack, tokens, H]
        deep = list(outs["deepstack_features"]) if "deepstack_features" in outs else []
        return outs["image_features"], deep

    def prompt_embeds(self, prompt: Prompt) -> tuple[np.ndarray, list[np.ndarray]]:
        """Token embeddings with the visual features merged, and dense deepstack inputs."""
        ids = np.asarray(prompt.input_ids, dtype=np.int64)
        embeds = self.embed.run(None, {"input_ids": ids})[0].astype(self.dtype, copy=False)
        feats, deep = self.visual_features(prompt)
        b, s = ids.shape
        if feats is None:
            return embeds, host.zeros_deepstack(self.spec, b, s, self.hidden, self.dtype)
        # images only: video prompts (video_grid_thw, pixel_values_videos) are not wired here
        embeds = host.merge_image_features(embeds, ids, feats, self.spec.image_token_id)
        if self.spec.deepstack_layers:
            if len(deep) != self.spec.deepstack_layers:
                raise ValueError(f"decoder wants {self.spec.deepstack_layers} deepstack maps, vision gave {len(deep)}")
            deep = host.scatter_deepstack(ids, deep, self.spec, self.dtype)
        return embeds, deep

    def empty_past(self, batch: int) -> list[np.ndarray]:
        """Zero-length K and V per layer, each in its input's type: a quantized cache's (int8, FP8
        bits) is not the embeddings' float type."""
        shape = (batch, self.kv_heads, 0, self.head_dim)
        types = {i.name: ORT_NUMPY.get(str(i.type), self.dtype) for i in self.inputs}
        return [np.zeros(shape, dtype=types.get(f"past_key_values.{i // 2}.{('key', 'value')[i % 2]}", self.dtype))
                for i in range(2 * self.n_layers)]

    def step(
        self, embeds: np.ndarray, mask: np.ndarray, position_ids: np.ndarray, past: list[np.ndarray],
        deepstack: list[np.ndarray] | None = None,
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """One decoder call: logits [B, S, V] and the present KV (the next call's past)."""
        outs = self.decoder.run(None, self.step_feeds(embeds, mask, position_ids, past, deepstack))
        return outs[0], list(outs[1:])

    def step_feeds(
        self, embeds: np.ndarray, mask: np.ndarray, position_ids: np.ndarray, past: list[np.ndarray],
        deepstack: list[np.ndarray] | None = None,
    ) -> dict[str, np.ndarray]:
        """The decoder's feeds for one call, in the graph's dtypes (what :meth:`step` runs)."""
        return host.prefill_feeds(self.inputs, embeds, mask, position_ids, deepstack, past=past)

    def prefill_feeds(self, prompt: Prompt, forced: np.ndarray | None = None) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """The feeds of the prompt's one decoder call (empty past) and its ``rope_deltas`` (decode
        steps add them). ``forced`` [B, n]: token ids fed after the prompt in the same pass
        (teacher forcing, :func:`hostside.text.teacher_forced`)."""
        ids, mask = np.asarray(prompt.input_ids, dtype=np.int64), prompt.mask()
        embeds, deep = self.prompt_embeds(prompt)
        pos, deltas = host.rope_index(self.spec, ids, prompt.image_grid_thw, None, mask)
        if forced is not None:
            tail = self.embed.run(None, {"input_ids": np.asarray(forced, dtype=np.int64)})[0]
            embeds, mask, pos, deep = host.teacher_forced(embeds, mask, pos, deltas, tail, deep)
        return self.step_feeds(embeds, mask, pos, self.empty_past(ids.shape[0]), deep), deltas

    def prefill(self, prompt: Prompt) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
        """The prompt through the decoder: logits [B, S, V], the present KV and ``rope_deltas``."""
        feeds, deltas = self.prefill_feeds(prompt)
        outs = self.decoder.run(None, feeds)
        return outs[0], list(outs[1:]), deltas

    # --- generation ------------------------------------------------------------------------

    def generate(self, prompt: Prompt, max_new_tokens: int = 16, return_logits: bool = False) -> Any:
        """Greedy decoding of ``max_new_tokens`` tokens (no EOS stop: a fixed-length comparison)."""
        mask = prompt.mask()
        logits, past, deltas = self.prefill(prompt)
        tokens, steps = [], [logits[:, -1]]
        nxt = np.argmax(logits[:, -1], axis=-1)
        for _ in range(max_new_tokens - 1):
            tokens.append(nxt)
            mask = host.extend_attention_mask(mask, 1)
            emb = self.embed.run(None, {"input_ids": nxt[:, None].astype(np.int64)})[0]
            logits, past = self.step(emb, mask, host.decode_position_ids(mask, deltas, 1), past)
            steps.append(logits[:, -1])
            nxt = np.argmax(logits[:, -1], axis=-1)
        tokens.append(nxt)
        out = np.stack(tokens, axis=1)
        return (out, np.stack(steps, axis=1)) if return_logits else out


def torch_generate(model: Any, prompt: Prompt, max_new_tokens: int = 16) -> np.ndarray:
    """The reference: ``model.generate`` greedy on the same prompt, exactly ``max_new_tokens`` new tokens."""
    import torch
    from transformers import GenerationConfig

    spec = host.TextSpec.from_config(_family(model), model.config)
    ids = torch.as_tensor(np.asarray(prompt.input_ids, dtype=np.int64))
    kw: dict[str, Any] = {
        "attention_mask": torch.as_tensor(prompt.mask()),
        "mm_token_type_ids": torch.as_tensor(host.mm_token_types(prompt.input_ids, spec)),
    }
    if prompt.pixel_values is not None:
        kw["pixel_values"] = torch.as_tensor(prompt.pixel_values)
        kw["image_grid_thw"] = torch.as_tensor(prompt.image_grid_thw)
    # No EOS: both sides produce the same fixed number of tokens, so agreement is per position.
    gen = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, min_new_tokens=0,
                           eos_token_id=None, pad_token_id=0, bos_token_id=None)
    with torch.no_grad():
        out = model.generate(ids, generation_config=gen, **kw)
    return out[:, ids.shape[1]:].numpy()


def _family(model: Any) -> str:
    return str(model.config.model_type)


def token_agreement(tokens: np.ndarray, ref: np.ndarray) -> float:
    """Share of positions (per row, up to the first divergence's effects included) that match."""
    return float(np.mean(np.asarray(tokens) == np.asarray(ref)))
