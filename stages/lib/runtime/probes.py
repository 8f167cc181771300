"""The packaged probe set as feeds and references per graph (format: ``probe/probe.json``'s "compare").

``probe/probe.npz`` is the reference stage's ``reference.npz`` unchanged: per sample ``s{i}.<name>``
the inputs (pixel_values, image_grid_thw, input_ids, attention_mask, position_ids,
inputs_embeds, deepstack.K) and the PyTorch outputs (vision_features, logits, generated).

* vision: ``hostside.vision.vision_inputs(spec, pixel_values, image_grid_thw)`` -> image_features
  (and Qwen3-VL deepstack maps) vs vision_features (deepstack.K);
* decoder: inputs_embeds, attention_mask, position_ids, an empty past (and dense deepstack maps)
  -> logits vs logits;
* generation: greedy from the prompt, no EOS stop: tokens vs generated.

The feeds are built from the session's own input list (names, shapes), not from the ONNX file,
so the same probe runs through an engine exactly as through onnxruntime.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from stages.lib.dtypes import ORT_FLOATS
from stages.lib.runtime.errors import PackageError
from stages.lib.runtime.package import Package

Case = tuple[dict[str, np.ndarray], dict[str, np.ndarray]]  # (feeds, reference outputs by output name)


def load(pkg: Package) -> tuple[dict[str, Any], list[dict[str, np.ndarray]]]:
    """(probe.json, one dict of arrays per sample)."""
    from stages.lib.packaging.layout import PROBE_JSON, PROBE_NPZ
    from stages.lib.reference_io import load_samples as load_probe

    npz, meta = pkg.root / PROBE_NPZ, pkg.root / PROBE_JSON
    if not npz.is_file():
        raise PackageError(f"{pkg.name}: {PROBE_NPZ} is missing (no held-out set to check against)")
    try:
        doc = json.loads(meta.read_text()) if meta.is_file() else {}
        samples = load_probe(npz)
    except (ValueError, OSError) as e:
        raise PackageError(f"{pkg.name}: the probe set cannot be read ({e})") from None
    return doc, samples


def gate(meta: dict[str, Any], graph: str, fallback_precision: str) -> tuple[str, dict[str, Any]]:
    """(precision, gate) the package was built under for ``graph``; generation uses the
    decoder's ``tokens`` threshold, as the verify stage does."""
    entry = (meta.get("gates") or {}).get("decoder" if graph == "generation" else graph) or {}
    g = dict(entry.get("gate") or {})
    if graph == "generation":
        g = {k: v for k, v in g.items() if k == "tokens"}
    return str(entry.get("precision") or fallback_precision), g


def fit(session: Any, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Feeds as the graph declares them (floats in its float type); a missing input is an error."""
    types = {i.name: i.type for i in session.get_inputs()}
    missing = [n for n in types if n not in feeds]
    if missing:
        raise PackageError(f"the probe set gives no input {missing[0]!r} for this graph")
    return {n: feeds[n].astype(ORT_FLOATS[t]) if t in ORT_FLOATS and np.issubdtype(feeds[n].dtype, np.floating)
            else feeds[n] for n, t in types.items()}


def vision_case(pkg: Package, session: Any, s: dict[str, np.ndarray]) -> Case | None:
    from stages.lib.hostside.vision import vision_inputs

    if "vision_features" not in s:
        return None
    spec = pkg.vision_spec()
    feeds = (vision_inputs(spec, s["pixel_values"], s["image_grid_thw"]) if spec is not None
             else {next(iter(i.name for i in session.get_inputs())): s["pixel_values"]})  # CNN / BYO: the image
    outs = [o.name for o in session.get_outputs()]
    name = "image_features" if "image_features" in outs else outs[0]
    refs = {name: s["vision_features"]}
    deep = sorted((o for o in outs if o.startswith("deepstack")), key=lambda k: (len(k), k))
    maps = sorted((k for k in s if k.startswith("deepstack.")), key=lambda k: int(k.split(".")[1]))
    if len(deep) == 1 and maps:  # export_vision stacks the maps: [K, N, H]
        refs[deep[0]] = np.stack([s[k] for k in maps])
    elif deep and len(deep) == len(maps):
        refs.update({o: s[k] for o, k in zip(deep, maps, strict=True)})
    if "logits" in outs and "logits" in s and pkg.runtime.get("text") is None:
        refs["logits"] = s["logits"]  # a CNN classifier head
    return feeds, refs


def decoder_case(pkg: Package, session: Any, s: dict[str, np.ndarray]) -> Case | None:
    from stages.lib.hostside.text import prefill_feeds, visual_mask

    if "logits" not in s or "inputs_embeds" not in s:
        return None
    spec = pkg.text_spec()
    deep = [s[f"deepstack.{k}"] for k in range(spec.deepstack_layers)]
    feeds = prefill_feeds(session.get_inputs(), s["inputs_embeds"], s["attention_mask"], s["position_ids"], deep,
                          visual_mask(s["input_ids"], spec) if deep else None)
    return feeds, {"logits": s["logits"]}


def generation_prompt(s: dict[str, np.ndarray]) -> tuple[Any, np.ndarray, np.ndarray | None] | None:
    """(prompt, the reference's greedy tokens, their leads: None in a package made before they
    were kept, where every position counts)."""
    from stages.lib.hostside.generate import Prompt

    if "generated" not in s or "input_ids" not in s:
        return None
    prompt = Prompt(s["input_ids"], s.get("attention_mask"), s.get("pixel_values"), s.get("image_grid_thw"))
    lead = s.get("generated_margin")
    tokens = np.asarray(s["generated"]).reshape(-1)
    return prompt, tokens, None if lead is None else np.asarray(lead).reshape(tokens.size, -1)


def noise(meta: dict[str, Any]) -> float:
    """The logit error a decisive position must clear (probe.json; 0 in older packages)."""
    return float((meta.get("decisive") or {}).get("noise") or 0.0)
