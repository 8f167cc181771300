"""Export the Qwen-VL language decoder and the token embedding to ONNX.

Exporter choice (measured on transformers 5.x / torch 2.13 CPU, tiny models of all three
families and a 715 MB Qwen2-VL-shaped decoder):

* ``torch.onnx.export(..., dynamo=True)`` -- used. Traces the transformers 5.x decoding code once
  the ``Cache`` is flat tensors (``patches/text.FlatKVCache``), keeps batch/sequence/past symbolic
  (past = 0 included), and its ONNX IR saves weights to external data tensor by tensor: export
  adds ~0.15 GB peak RSS over the loaded model on the 715 MB decoder, where serialising the
  model inline adds ~1.9 GB (a second and third copy). With ``decoder_load.load_decoder`` a
  1.04B Qwen2.5-VL (1.41 GiB FP16 decoder weights) exports at 1.94 GiB peak RSS (1.38x the
  weights, interpreter and libraries included) in ~90 s here. Slow on tiny models: ~8-20 s.
* ``torch.onnx.export(..., dynamo=False)`` (TorchScript) -- same parity on every held-out shape
  and ~10x faster on tiny models, but deprecated since torch 2.9, warns that it freezes Python
  control flow (``position_ids.shape[0] == 4``) and builds the whole ModelProto in memory (peak
  +1.9 GB on the 715 MB decoder). Kept as ``exporter="torchscript"`` for quick tests only.
* optimum-onnx -- no Qwen2-VL / Qwen2.5-VL / Qwen3-VL export (its support PR is still open), so
  not an option for these families.

The whole-decoder trace grows with depth (a 36-layer checkpoint: 150-260 s; a 1.43B model with
the 151936 vocab peaked at 6.4x its weights). The stage's default is ``decoder_stamp``: this
exporter traces a few layers (``trace_decoder``) and the rest are cloned from them. Either way
the residual value after each layer is recorded in the model (``segment_cuts``).

The decoder graph is one graph for prefill and decode: ``inputs_embeds`` [B, S, H],
``attention_mask`` [B, past+S] (1 = real token), ``position_ids`` [3, B, S] (M-RoPE rows t/h/w),
``past_key_values.N.key/value`` [B, kv_heads, past, head_dim] -> ``logits`` [B, S, V],
``present.N.key/value`` [B, kv_heads, past+S, head_dim] (ORT GenAI / Olive names), plus for
Qwen3-VL ``deepstack_embeds.K`` [B, S, H] (dense, zero at text positions; added after layer K).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from stages.lib.dtypes import torch_dtype

# Weights go to external data (``<graph>.onnx.data``) above this size. Saving inline serialises the
# whole ModelProto in memory: a second copy of the weights (measured on a 715 MB decoder: peak RSS
# +1.9 GB inline vs +0.15 GB with external data, both exporters' inline paths alike). Protobuf's
# 2 GB cap is far above; small graphs stay one file for convenience.
EXTERNAL_DATA_BYTES = 256 * 1024**2


def decoder_dims(text_config: Any) -> dict[str, int]:
    heads = int(text_config.num_attention_heads)
    head_dim = int(getattr(text_config, "head_dim", None) or text_config.hidden_size // heads)
    return {
        "layers": int(text_config.num_hidden_layers),
        "hidden": int(text_config.hidden_size),
        "kv_heads": int(text_config.num_key_value_heads),
        "head_dim": head_dim,
        "vocab": int(text_config.vocab_size),
    }


def io_names(n_layers: int, n_deepstack: int) -> tuple[list[str], list[str]]:
    inputs = ["inputs_embeds", "attention_mask", "position_ids"]
    outputs = ["logits"]
    for i in range(n_layers):
        inputs += [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
        outputs += [f"present.{i}.key", f"present.{i}.value"]
    inputs += [f"deepstack_embeds.{k}" for k in range(n_deepstack)]
    return inputs, outputs


def _wrapper(model: Any, n_layers: int, n_deepstack: int) -> Any:
    """An nn.Module over flat tensors around ``model.model.language_model`` + ``lm_head``."""
    import torch

    from stages.lib.patches.text import FlatKVCache

    class DecoderForExport(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.text_model = model.model.language_model
            self.lm_head = model.lm_head

        def forward(self, inputs_embeds: Any, attention_mask: Any, position_ids: Any, *rest: Any) -> Any:
            past = [(rest[2 * i], rest[2 * i + 1]) for i in range(n_layers)]
            deep = list(rest[2 * n_layers : 2 * n_layers + n_deepstack])
            cache = FlatKVCache(past)
            seq = inputs_embeds.shape[1]
            total = attention_mask.shape[1]
            # Additive FP32 mask [B, 1, S, total]: causal with the past offset, and padding
            # (attention_mask == 0) masked. Built in the graph so the host passes only the
            # 2-D mask, like ORT GenAI.
            q_pos = torch.arange(seq, device=inputs_embeds.device) + (total - seq)
            k_pos = torch.arange(total, device=inputs_embeds.device)
            allowed = (k_pos[None, :] <= q_pos[:, None])[None, None] & (attention_mask[:, None, None, :] > 0)
            mask = torch.where(allowed, 0.0, torch.finfo(torch.float32).min).to(torch.float32)
            kwargs: dict[str, Any] = {}
            if n_deepstack:
                kwargs = {"deepstack_visual_embeds": deep, "visual_pos_masks": None}
            out = self.text_model(
                inputs_embeds=inputs_embeds,
                attention_mask=mask,
                position_ids=position_ids,
                past_key_values=cache,
                use_cache=True,
                **kwargs,
            )
            logits = self.lm_head(out.last_hidden_state)
            flat = [t for kv in cache.present for t in kv]  # type: ignore[union-attr]
            return (logits, *flat)

    return DecoderForExport().eval()


def sample_inputs(dims: dict[str, int], n_deepstack: int, batch: int, seq: int, past: int, dtype: Any, seed: int = 0) -> list[Any]:
    """Random decoder inputs (torch) of the given shapes, positions continuing after ``past``."""
    import torch

    g = torch.Generator().manual_seed(seed)
    h, kvh, hd = dims["hidden"], dims["kv_heads"], dims["head_dim"]
    embeds = torch.randn(batch, seq, h, generator=g).to(dtype)
    mask = torch.ones(batch, past + seq, dtype=torch.int64)
    pos = (torch.arange(seq) + past).view(1, 1, seq).expand(3, batch, seq).contiguous()
    flat = [torch.randn(batch, kvh, past, hd, generator=g).to(dtype) for _ in range(2 * dims["layers"])]
    deep = [torch.randn(batch, seq, h, generator=g).to(dtype) for _ in range(n_deepstack)]
    return [embeds, mask, pos, *flat, *deep]


def dynamic_axes(n_layers: int, n_deepstack: int) -> dict[str, dict[int, str]]:
    ax: dict[str, dict[int, str]] = {
        "inputs_embeds": {0: "batch", 1: "seq"},
        "attention_mask": {0: "batch", 1: "total"},
        "position_ids": {1: "batch", 2: "seq"},
        "logits": {0: "batch", 1: "seq"},
    }
    for i in range(n_layers):
        for kv in ("key", "value"):
            ax[f"past_key_values.{i}.{kv}"] = {0: "batch", 2: "past"}
            ax[f"present.{i}.{kv}"] = {0: "batch", 2: "total"}
    for k in range(n_deepstack):
        ax[f"deepstack_embeds.{k}"] = {0: "batch", 1: "seq"}
    return ax


def _dynamic_shapes(n_layers: int, n_deepstack: int) -> tuple[Any, ...]:
    # Dim.DYNAMIC rather than named Dims: torch.export then infers total == past + seq from the
    # concat itself (named Dims would need that relation spelled out, which Dim arithmetic
    # cannot express between two symbols). The ONNX dim names are set afterwards.
    from torch.export import Dim

    d = Dim.DYNAMIC
    kv = {0: d, 2: d}
    return (
        {0: d, 1: d},
        {0: d, 1: d},
        {1: d, 2: d},
        # ``*rest`` of the wrapper's forward is one tuple in torch.export's input structure
        (*[kv for _ in range(2 * n_layers)], *[{0: d, 1: d} for _ in range(n_deepstack)]),
    )


def trace_decoder(model: Any, family: str, n_deepstack: int, dtype: str, opset: int, sample: dict[str, int]) -> Any:
    """The dynamo-exported, optimised graph of ``model`` (already in ``dtype``) as an onnx-ir model."""
    import torch

    from stages.lib.patches.text import decoder_export_patches

    dims = decoder_dims(model.config.text_config)
    wrapper = _wrapper(model, dims["layers"], n_deepstack)
    # Sizes 0 and 1 are specialised by torch.export: the sample uses >= 2 on every dynamic axis.
    args = sample_inputs(dims, n_deepstack, sample["batch"], sample["seq"], sample["past"], torch_dtype(dtype))
    in_names, out_names = io_names(dims["layers"], n_deepstack)
    with torch.no_grad(), decoder_export_patches(family, wrapper.text_model):
        prog = torch.onnx.export(
            wrapper, tuple(args), dynamo=True, opset_version=opset, input_names=in_names, output_names=out_names,
            dynamic_shapes=_dynamic_shapes(dims["layers"], n_deepstack), optimize=True, verify=False,
        )
    if prog is None:
        raise RuntimeError("torch.onnx.export(dynamo=True) returned no program")
    return prog.model


def export_decoder_graph(
    model: Any, family: str, n_deepstack: int, out_path: Path, dtype: str, opset: int, sample: dict[str, int],
    exporter: str = "dynamo",
) -> dict[str, Any]:
    """Export ``model`` (already in ``dtype``) to ``out_path``; returns export facts.

    The dynamo export records the residual cut after each layer (``segment_cuts``) in the model.
    """
    import torch

    from stages.lib.segments.cuts import cuts_from_name_scopes, write_cuts

    dims = decoder_dims(model.config.text_config)
    t0 = time.perf_counter()
    if exporter == "dynamo":
        import onnx_ir as ir

        onnx_model = trace_decoder(model, family, n_deepstack, dtype, opset, sample)
        write_cuts(onnx_model, cuts_from_name_scopes(onnx_model))
        external = _weight_bytes(model) > EXTERNAL_DATA_BYTES
        ir.save(onnx_model, str(out_path), external_data=out_path.name + ".data" if external else None)
    else:
        from stages.lib.patches.text import decoder_export_patches

        wrapper = _wrapper(model, dims["layers"], n_deepstack)
        args = sample_inputs(dims, n_deepstack, sample["batch"], sample["seq"], sample["past"], torch_dtype(dtype))
        in_names, out_names = io_names(dims["layers"], n_deepstack)
        with torch.no_grad(), decoder_export_patches(family, wrapper.text_model):
            torch.onnx.export(
                wrapper, tuple(args), str(out_path), dynamo=False, opset_version=opset, input_names=in_names,
                output_names=out_names, dynamic_axes=dynamic_axes(dims["layers"], n_deepstack),
            )
    return {"export_seconds": time.perf_counter() - t0, "exporter": exporter,
            "external_data": out_path.with_name(out_path.name + ".data").exists(), **dims}


def _weight_bytes(model: Any) -> int:
    return int(sum(p.numel() * p.element_size() for p in model.parameters()))


def export_embed_graph(weight: np.ndarray, out_path: Path, opset: int) -> None:
    """``input_ids`` [B, S] int64 -> ``inputs_embeds`` [B, S, H]: one Gather over the table.

    Written directly with onnx.helper: the graph is a single op, and building it by hand avoids
    a trace (and a second copy of the table inside an exporter).
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    if weight.dtype == BF16:
        table = helper.make_tensor("embed_tokens.weight", TensorProto.BFLOAT16, weight.shape, weight.tobytes(), raw=True)
        elem = TensorProto.BFLOAT16
    else:
        table = numpy_helper.from_array(weight, name="embed_tokens.weight")
        elem = helper.np_dtype_to_tensor_dtype(weight.dtype)
    graph = helper.make_graph(
        [helper.make_node("Gather", ["embed_tokens.weight", "input_ids"], ["inputs_embeds"], axis=0)],
        "embed",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("inputs_embeds", elem, ["batch", "seq", weight.shape[1]])],
        [table],
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="vlmforge")
    # onnx's newest IR version can run ahead of onnxruntime/TensorRT parsers: the lowest the opset allows
    m.ir_version = helper.find_min_ir_version_for(list(m.opset_import))
    big = weight.nbytes > EXTERNAL_DATA_BYTES
    onnx.save_model(m, str(out_path), save_as_external_data=big, location=out_path.name + ".data" if big else None)


def embed_table(model: Any) -> np.ndarray:
    """The token-embedding table as numpy in the model's dtype (BF16 as raw uint16 bits)."""
    import torch

    w = model.get_input_embeddings().weight.detach()
    if w.dtype == torch.bfloat16:
        return w.view(torch.uint16).numpy().view(BF16)
    return w.numpy()


# numpy has no bfloat16: a named 2-byte void type marks raw BF16 bits for export_embed_graph
BF16 = np.dtype((np.void, 2))
