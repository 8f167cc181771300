"""The verify stage's workers: run each graph under test on the held-out set and measure it.

Graphs run in onnxruntime on CPU with graph optimizations *off* (NOTES §3: with them on, ORT
fuses Q/DQ into integer kernels that reject FP8 and round differently from TensorRT). The
isolated runs go through Polygraphy's ``OnnxrtRunner`` + ``Comparator.run`` over that session
(its own ORT loader cannot disable optimizations); the numbers are ours (stages/lib/metrics).
The decoder is fed the *reference* merged embeddings, so its figures isolate the decoder; the
greedy generation then chains the graphs under test end to end (stages/lib/generate.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.stage import StageError
from stages.lib.drilldown import fit_feeds
from stages.lib.metrics import Parity, compare, topk_agreement, worst
from stages.lib.ortsession import reference_session


@dataclass
class Specs:
    family: str
    text: Any  # hostside.text.TextSpec
    vision: Any  # hostside.vision.VisionSpec
    config: Any  # the checkpoint's transformers config (None for a bring-your-own ONNX)
    path: Path | None  # None: a bring-your-own ONNX has no checkpoint (and no PyTorch model)


def load_specs(checkpoint: Path, trust_remote_code: bool = False) -> Specs:
    from stages.lib.checkpoints import (
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


def _run_all(path: Path, feeds: list[dict[str, np.ndarray]], name: str) -> list[dict[str, np.ndarray]]:
    """One run per feed dict through Polygraphy's Comparator over an optimization-free session."""
    from polygraphy.backend.onnxrt import OnnxrtRunner
    from polygraphy.comparator import Comparator
    from polygraphy.logger import G_LOGGER

    G_LOGGER.module_severity = G_LOGGER.ERROR
    sess = reference_session(path)
    runner = OnnxrtRunner(sess, name=name)
    results = Comparator.run([runner], data_loader=[fit_feeds(sess, f) for f in feeds])
    return [{k: np.asarray(v) for k, v in it.items()} for it in results[name]]


def _dtype(path: Path, input_name: str) -> Any:
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    for i in m.graph.input:
        if i.name == input_name:
            return onnx.helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type)
    raise StageError(f"{path.name} has no input {input_name!r}")


def vision_feeds(specs: Specs, sample: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    from stages.lib.hostside.vision import vision_inputs

    if specs.vision is None:  # vision-only CNN: the normalised image is the only input
        return {"pixel_values": sample["pixel_values"]}
    return vision_inputs(specs.vision, sample["pixel_values"], sample["image_grid_thw"])


def decoder_feeds(path: Path, specs: Specs, sample: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Prefill feeds: reference merged embeddings, mask, M-RoPE ids, empty KV, deepstack maps."""
    import onnx

    from stages.lib.hostside.text import scatter_deepstack

    dt = _dtype(path, "inputs_embeds")
    m = onnx.load(str(path), load_external_data=False)
    feeds = {"inputs_embeds": sample["inputs_embeds"].astype(dt), "attention_mask": sample["attention_mask"],
             "position_ids": sample["position_ids"]}
    deep = [sample[f"deepstack.{k}"] for k in range(specs.text.deepstack_layers)]
    dense = scatter_deepstack(sample["input_ids"], deep, specs.text, dt) if deep else []
    for i in m.graph.input:
        if i.name.startswith("past_key_values."):
            d = [x.dim_value for x in i.type.tensor_type.shape.dim]
            feeds[i.name] = np.zeros((1, d[1], 0, d[3]), dtype=dt)
        elif i.name.startswith("deepstack_embeds."):
            feeds[i.name] = dense[int(i.name.split(".")[1])]
    return feeds


@dataclass
class Measured:
    figures: dict[str, Any]  # worst-case figures over the samples (what the gate sees)
    per_sample: list[dict[str, Any]] = field(default_factory=list)


def _figures(ps: list[Parity]) -> dict[str, Any]:
    return worst(ps).as_dict()


def deepstack_maps(outputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Qwen3-VL deepstack maps from the vision graph's outputs, in layer order: one stacked
    ``deepstack_features`` [K, N, H] or one output per map (``deepstack*.K``)."""
    names = sorted((k for k in outputs if k.startswith("deepstack")), key=lambda k: (len(k), k))
    if len(names) == 1 and outputs[names[0]].ndim == 3:
        return list(outputs[names[0]])
    return [outputs[k] for k in names]


def measure_vision(path: Path, specs: Specs, samples: list[dict[str, np.ndarray]]) -> Measured:
    outs = _run_all(path, [vision_feeds(specs, s) for s in samples], "vision")
    per: list[dict[str, Any]] = []
    ps: list[Parity] = []
    t1: list[float] = []
    for s, o in zip(samples, outs, strict=True):
        name = "image_features" if "image_features" in o else next(iter(o))
        p = compare(o[name].reshape(s["vision_features"].shape), s["vision_features"])
        ds = [compare(d.reshape(s[f"deepstack.{j}"].shape), s[f"deepstack.{j}"]) for j, d in enumerate(deepstack_maps(o))]
        ps += [p, *ds]
        per.append({**p.as_dict(), "deepstack": [d.as_dict() for d in ds]})
        if "logits" in o and "logits" in s:  # a classifier head (CNN): its logits and top-1 too
            lg = compare(o["logits"].reshape(s["logits"].shape), s["logits"])
            ps.append(lg)
            t1.append(topk_agreement(o["logits"], s["logits"], 1))
            per[-1]["logits"] = {**lg.as_dict(), "top1": t1[-1]}
    return Measured({**_figures(ps), **({"top1": float(np.mean(t1))} if t1 else {})}, per)


def measure_decoder(path: Path, specs: Specs, samples: list[dict[str, np.ndarray]]) -> Measured:
    outs = _run_all(path, [decoder_feeds(path, specs, s) for s in samples], "decoder")
    per, ps, t1, t5 = [], [], [], []
    for s, o in zip(samples, outs, strict=True):
        logits = o["logits"] if "logits" in o else next(iter(o.values()))
        p = compare(logits, s["logits"])
        top1, top5 = topk_agreement(logits, s["logits"], 1), topk_agreement(logits, s["logits"], 5)
        ps.append(p)
        t1.append(top1)
        t5.append(top5)
        per.append({**p.as_dict(), "top1": top1, "top5": top5})
    # top-k: the share of all prefill positions (pooled over samples), as the gate reads it
    n = [int(s["logits"].shape[1]) for s in samples]
    pooled = {"top1": float(np.dot(t1, n) / sum(n)), "top5": float(np.dot(t5, n) / sum(n))}
    return Measured({**_figures(ps), **pooled}, per)


def measure_generation(vision: Path | None, decoder: Path, embed: Path, specs: Specs,
                       samples: list[dict[str, np.ndarray]], n: int) -> Measured:
    """Greedy generation through vision -> merge -> decoder (KV cache), vs ``model.generate``."""
    from stages.lib import generate as gen

    # ORT's default optimizations fuse Q/DQ into integer kernels that reject FP8 at load time
    # (NOTES §3): the graphs under test run without them.
    pipe = gen.OrtPipeline(decoder, embed, specs.text, vision, specs.vision, optimization="none")
    per, agree, prefix = [], [], []
    for s in samples:
        prompt = gen.Prompt(s["input_ids"], s["attention_mask"], pixel_values=s["pixel_values"],
                        image_grid_thw=s["image_grid_thw"])
        if vision is None:  # decoder-only check: the reference image features stand in
            prompt = gen.Prompt(s["input_ids"], s["attention_mask"], image_grid_thw=s["image_grid_thw"],
                            image_features=s["vision_features"],
                            deepstack_features=[s[f"deepstack.{k}"] for k in range(specs.text.deepstack_layers)])
        toks = np.asarray(pipe.generate(prompt, max_new_tokens=n))[0]
        ref = s["generated"][:n]
        same = toks[: len(ref)] == ref
        first = int(np.argmin(same)) if not same.all() else len(ref)
        agree.append(gen.token_agreement(toks[: len(ref)], ref))
        prefix.append(first / len(ref))
        per.append({"tokens": toks.tolist(), "reference": ref.tolist(), "agreement": agree[-1],
                    "first_divergence": None if first == len(ref) else first})
    # share of all generated tokens (pooled); the prefix share is the strict reading: tokens
    # after a first divergence follow another prompt, so matches there are partly luck
    return Measured({"tokens": float(np.mean(agree)), "tokens_prefix": float(np.mean(prefix))}, per)


def embed_graph(quantize: Path, specs: Specs, workdir: Path) -> tuple[Path, str]:
    """The token-embedding graph: the quantize folder's, or one written from the checkpoint's table."""
    if (quantize / "embed.onnx").is_file():
        return quantize / "embed.onnx", "quantize/embed.onnx"
    from safetensors import safe_open

    from stages.lib.decoder_export import export_embed_graph

    if specs.path is None:
        raise StageError(f"no embed.onnx in {quantize} and no checkpoint to take the embedding table from")
    index = specs.path / "model.safetensors.index.json"
    shards = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else \
        sorted(p.name for p in specs.path.glob("*.safetensors"))
    for shard in shards:
        with safe_open(str(specs.path / shard), "np") as f:
            key = next((k for k in f.keys() if k.endswith("embed_tokens.weight")), None)
            if key is not None:
                workdir.mkdir(parents=True, exist_ok=True)
                export_embed_graph(f.get_tensor(key).astype(np.float32), workdir / "embed.onnx", 17)
                _cap_ir_version(workdir / "embed.onnx")
                return workdir / "embed.onnx", f"checkpoint {shard}:{key}"
    raise StageError(f"{specs.path}: no embed_tokens.weight in the checkpoint and no embed.onnx in {quantize}")


def _cap_ir_version(path: Path, most: int = 10) -> None:
    """onnx may stamp an IR version newer than the installed onnxruntime loads; a single Gather
    needs nothing newer than IR 10 (opset 17)."""
    import onnx

    m = onnx.load(str(path), load_external_data=False)  # external tensors keep pointing beside it
    if m.ir_version > most:
        m.ir_version = most
        onnx.save(m, str(path))
