"""The verify stage's workers: run each graph under test on the held-out set and measure it.

Graphs run in onnxruntime on CPU with graph optimizations *off* (docs/FIELD_NOTES.md §3: with them on, ORT
fuses Q/DQ into integer kernels that reject FP8 and round differently from TensorRT), block by
block through the segment runner (stages/lib/segments/runner.py): a whole-graph CPU session of a 7-8B
decoder holds ~2x its weights and grows per run, past a 24 GB machine; a graph without cuts
(vision, small graphs) runs as one segment. The numbers are ours (stages/lib/metrics).

The decoder is fed the *reference* merged embeddings (the feeds: ``stages.lib.parity.feeds``),
so its figures isolate the decoder. The same pass carries the reference's greedy tokens after
the prompt (teacher forcing, positions as the decode loop gives them): causal attention leaves
the prompt's logits unchanged, and the argmax at each position that predicts a generated token
is the teacher-forced token agreement, for one prefill's cost at any size. The free-running greedy generation chains the graphs under
test end to end (stages/lib/hostside/generate.py) in whole-graph sessions, so it runs only for graphs
under ``FREE_RUN_LIMIT``; above it the engine check on a GPU host generates.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.stage import StageError
from stages.lib.parity.drilldown import fit_feeds
from stages.lib.parity.feeds import Specs, decoder_feeds, vision_feeds
from stages.lib.parity.metrics import (
    Agreement,
    Parity,
    compare,
    decisive_agreement,
    decisive_top1,
    topk_agreement,
    worst,
)

# FP16-equivalent weight bytes (2 x parameters) of vision + embed + decoder under which the
# free-running generation runs in whole-graph CPU sessions. Those peak at ~2.2x the bytes
# (6.3 GB for a 2.9 GB FP16 decoder + embed: FP32 upcasts per run, the arena) and a Q/DQ graph
# dequantizes to FP32 on top; under 512 MiB that stays inside 1.25 x the decoder + 2 GB.
FREE_RUN_LIMIT = 512 * 2**20
Report = Callable[[str], None]


def run_graph(path: Path, feeds: Sequence[dict[str, np.ndarray]], on_sample: Callable[[int, dict[str, np.ndarray]], None],
              expose: Sequence[str] | None = None, cuts: Sequence[str] | None = None,
              report: Report | None = None) -> None:
    """Every feed through the graph segment-major (its own cuts unless ``cuts``; [] = whole):
    ``on_sample(i, outputs)`` once per sample, with the ``expose``d values (None: graph outputs)."""
    from stages.lib.segments.runner import graph_inputs, run_segmented

    got: list[dict[str, np.ndarray]] = [{} for _ in feeds]
    last: list[int] = []

    def keep(seg: Any, i: int, values: dict[str, np.ndarray]) -> None:
        got[i].update(values)
        if seg.index == last[0]:  # the sample is complete: hand it over and let it go
            on_sample(i, got[i])
            got[i] = {}

    def progress(k: int, n: int) -> None:
        last[:] = [n - 1]
        if report is not None and n > 1:
            report(f"{path.stem} segment {k + 1}/{n} ({len(feeds)} samples)")

    ins = graph_inputs(path)
    fitted = [fit_feeds(ins, f) for f in feeds]
    run_segmented(path, fitted, keep, cuts=cuts, expose=expose, progress=progress)


def fp16_weight_bytes(path: Path) -> int:
    """2 bytes per parameter of the graph's initializers, read without the weights."""
    import math

    import onnx

    m = onnx.load(str(path), load_external_data=False)
    return 2 * sum(math.prod(t.dims) for t in m.graph.initializer)


@dataclass
class Measured:
    figures: dict[str, Any]  # worst-case figures over the samples (what the gate sees)
    per_sample: list[dict[str, Any]] = field(default_factory=list)
    outputs: list[dict[str, np.ndarray]] = field(default_factory=list)  # the graph's, per sample (vision)


def _figures(ps: list[Parity]) -> dict[str, Any]:
    return worst(ps).as_dict()


def deepstack_maps(outputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Qwen3-VL deepstack maps from the vision graph's outputs, in layer order: one stacked
    ``deepstack_features`` [K, N, H] or one output per map (``deepstack*.K``)."""
    names = sorted((k for k in outputs if k.startswith("deepstack")), key=lambda k: (len(k), k))
    if len(names) == 1 and outputs[names[0]].ndim == 3:
        return list(outputs[names[0]])
    return [outputs[k] for k in names]


def measure_vision(path: Path, specs: Specs, samples: list[dict[str, np.ndarray]],
                   report: Report | None = None, gate: dict[str, Any] | None = None,
                   names: list[str] | None = None) -> Measured:
    """Vision parity per sample; with ``gate`` and samples that carry a noise floor (a BYO
    reference), each sample is graded at the coarser of the gate and twice its floor (``parity.noise_floor``)."""
    from stages.lib.parity.noise_floor import graded

    outs: list[dict[str, np.ndarray]] = [{} for _ in samples]
    run_graph(path, [vision_feeds(specs, s) for s in samples], lambda i, o: outs[i].update(o), report=report)
    per: list[dict[str, Any]] = []
    ps: list[Parity] = []
    by_sample: list[list[Parity]] = []
    t1: list[float] = []
    for s, o in zip(samples, outs, strict=True):
        name = "image_features" if "image_features" in o else next(iter(o))
        p = compare(o[name].reshape(s["vision_features"].shape), s["vision_features"])
        ds = [compare(d.reshape(s[f"deepstack.{j}"].shape), s[f"deepstack.{j}"]) for j, d in enumerate(deepstack_maps(o))]
        ps += [p, *ds]
        by_sample.append([p, *ds])
        per.append({**p.as_dict(), "deepstack": [d.as_dict() for d in ds]})
        if "noise_floor" in s:
            per[-1]["noise_floor"] = [float(v) for v in s["noise_floor"]]
        if "logits" in o and "logits" in s:  # a classifier head (CNN): its logits and top-1 too
            lg = compare(o["logits"].reshape(s["logits"].shape), s["logits"])
            ps.append(lg)
            by_sample[-1].append(lg)
            t1.append(topk_agreement(o["logits"], s["logits"], 1))
            per[-1]["logits"] = {**lg.as_dict(), "top1": t1[-1]}
    floors = [s.get("noise_floor") for s in samples]
    figures = graded(by_sample, floors, gate, names) if gate is not None and any(f is not None for f in floors) \
        else _figures(ps)
    return Measured({**figures, **({"top1": float(np.mean(t1))} if t1 else {})}, per, outs)


def embed_tokens(embed: Path, samples: list[dict[str, np.ndarray]], n: int) -> list[np.ndarray]:
    """Embeddings [1, n - 1, H] of each sample's first n - 1 reference tokens: the tokens fed
    back after the prompt so the n positions from the prompt's last one predict all n."""
    from stages.lib.segments.runner import run_whole

    ids = np.stack([s["generated"][: n - 1] for s in samples]).astype(np.int64)
    out = next(iter(run_whole(embed, fit_feeds(embed, {"input_ids": ids})).values()))
    return [out[i: i + 1] for i in range(len(samples))]


def measure_decoder(path: Path, specs: Specs, samples: list[dict[str, np.ndarray]], embed: Path | None = None,
                    n: int = 0, cuts: Sequence[str] | None = None, report: Report | None = None,
                    noise: float = 0.0) -> tuple[Measured, Measured | None]:
    """Prefill parity and, with ``embed`` and ``n`` > 0, the teacher-forced agreement over the
    reference's first n greedy tokens, from one segment-major pass (``cuts``: run_graph's).
    With a quantized cache the generated tokens go in a second pass, one chunk reading the
    prompt's cache. ``top1`` and ``tokens`` count only decisive positions (``metrics.decisive``: the reference's
    lead above twice ``noise``, the unquantized export's logit error); ``top1_all`` and
    ``tokens_teacher_forced`` count every position."""
    n = min([n, *(len(s.get("generated", ())) for s in samples)]) if embed is not None else 0
    after = embed_tokens(embed, samples, n) if embed is not None and n > 1 else [None] * len(samples)
    # a quantized cache (qdq.kv_cache) changes only what later calls read: the prompt goes first
    # and its presents carry the generated tokens' pass, one chunk through the cache
    cached = n > 1 and quantized_cache(path)
    feeds = [decoder_feeds(path, specs, s, None if cached else a) for s, a in zip(samples, after, strict=True)]
    presents: list[list[np.ndarray]] = [[] for _ in samples]
    prompt_last = [0] * len(samples)  # the token the prompt's last position predicts
    per: list[dict[str, Any]] = [{} for _ in samples]
    forced: list[dict[str, Any]] = [{} for _ in samples]
    ps: list[Parity | None] = [None] * len(samples)
    top1 = [Agreement(0, 0, 0)] * len(samples)
    tokens = [Agreement(0, 0, 0)] * len(samples)

    def grade(i: int, o: dict[str, np.ndarray]) -> None:  # per sample, then its logits go
        s, logits = samples[i], o["logits"] if "logits" in o else next(iter(o.values()))
        seq = int(s["logits"].shape[1])
        pre = logits[:, :seq]  # causal: the tokens after the prompt leave these unchanged
        if cached:  # the next pass's past; the generated positions are graded after it
            presents[i] = [o[k] for k in kv_outputs]
            prompt_last[i] = int(np.argmax(pre[0, -1]))
        ps[i] = parity = compare(pre, s["logits"])
        top1[i] = decisive_top1(pre, s["logits"], noise)
        per[i] = {**parity.as_dict(), "top1": top1[i].agreement, "top1_all": topk_agreement(pre, s["logits"], 1),
                  "top5": topk_agreement(pre, s["logits"], 5), "decisive_positions": top1[i].decisive}
        if n and not cached:
            forced_tokens(i, np.argmax(logits[0, seq - 1: seq - 1 + n], axis=-1))

    def forced_tokens(i: int, toks: np.ndarray) -> None:
        s, ref = samples[i], samples[i]["generated"][:n]
        tokens[i] = decisive_agreement(toks, ref, reference_margins(s, n), noise)
        forced[i] = {"tokens": toks.tolist(), "reference": ref.tolist(), "agreement": float(np.mean(toks == ref)),
                     "decisive": tokens[i].decisive, "decisive_agreement": tokens[i].agreement}

    names = _output_names(path)
    kv_outputs = [k for k in names if k.startswith("present.")] if cached else []
    run_graph(path, feeds, grade, expose=["logits", *kv_outputs] if "logits" in names else None, cuts=cuts,
              report=report)
    if cached:
        tails = [decoder_feeds(path, specs, s, a, past=pr) for s, a, pr in zip(samples, after, presents, strict=True)]
        presents.clear()

        def grade_tail(i: int, o: dict[str, np.ndarray]) -> None:
            forced_tokens(i, np.concatenate([[prompt_last[i]], np.argmax(o["logits"][0], axis=-1)])[:n])

        run_graph(path, tails, grade_tail, expose=["logits"], cuts=cuts, report=report)
    # the share of all prefill positions (pooled over samples), as the gate reads it
    w = [int(s["logits"].shape[1]) for s in samples]
    pooled = {k: float(np.dot([p[k] for p in per], w) / sum(w)) for k in ("top1_all", "top5")}
    figures = {**_figures([p for p in ps if p is not None]), **pooled, **agreement_figures("top1", sum(top1[1:], top1[0]))}
    prefill = Measured(figures, per)
    if not n:
        return prefill, None
    tf = float(np.mean([f["agreement"] for f in forced]))
    return prefill, Measured({"tokens_teacher_forced": tf, **agreement_figures("tokens", sum(tokens[1:], tokens[0]))},
                             forced)


def quantized_cache(path: Path) -> str | None:
    """The decoder's cache type when it is not a float one (``qdq.kv_cache``), else None."""
    from stages.lib.segments.runner import graph_inputs

    kinds = {i.type for i in graph_inputs(path) if i.name.startswith("past_key_values.")}
    low = sorted(k for k in kinds if "float" not in k or "float8" in k)
    return low[0][len("tensor("):-1] if low else None


def agreement_figures(name: str, a: Agreement) -> dict[str, Any]:
    """``name`` (the decisive agreement, absent when no position was decisive: nothing is gated
    then) and ``<name>_decisive`` (how many positions counted, of how many)."""
    out: dict[str, Any] = {f"{name}_decisive": f"{a.decisive}/{a.positions}"}
    if a.agreement is not None:
        out[name] = a.agreement
    return out


def reference_margins(sample: dict[str, np.ndarray], n: int) -> np.ndarray:
    """The reference's lead at each of its first n greedy steps (the reference stage stores it)."""
    if "generated_margin" not in sample:
        raise StageError("the held-out reference has no generated_margin (written by an older reference stage); "
                         "rebuild the reference stage")
    return np.asarray(sample["generated_margin"][:n], dtype=np.float64)


def _output_names(path: Path) -> list[str]:
    import onnx

    return [o.name for o in onnx.load(str(path), load_external_data=False).graph.output]


def measure_generation(vision: Path | None, decoder: Path, embed: Path, specs: Specs,
                       samples: list[dict[str, np.ndarray]], n: int) -> Measured:
    """Greedy generation through vision -> merge -> decoder (KV cache), vs ``model.generate``."""
    from stages.lib.hostside import generate as gen

    # ORT's default optimizations fuse Q/DQ into integer kernels that reject FP8 at load time
    # (docs/FIELD_NOTES.md §3): the graphs under test run without them.
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

    from stages.lib.export.decoder import export_embed_graph

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
