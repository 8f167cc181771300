"""The package's JSON documents: ``runtime.json`` (what a host needs without transformers),
``probe/probe.json`` (what the probe arrays are, the gates to grade engines by) and
``manifest.json`` (what the package is). Pure functions of what ``sources`` read.

runtime.json = {"format", "family",
  "graphs": {g: the graph's io spec (inputs/outputs: name, dtype, shape; profile; ...)},
  "text": decoder.json["host"] (``hostside.text.TextSpec(**text)``) or null (vision-only),
  "rope": {"mrope_section", "mrope_interleaved", "rope_theta", "rope_type"} of the text model,
  "vision": vision.json["spec"] (``hostside.vision.VisionSpec.from_dict``) or null (CNN / BYO graph),
  "preprocess": null, or for a CNN / BYO vision graph {"layout", "preprocess": {mean, std, ...}},
  "generation": generation_config.json or null,
  "special_tokens": {"bos_token"|"eos_token"|"pad_token"|"unk_token"|"image_token"|"video_token"|
                     "vision_start_token"|"vision_end_token": id} (those the checkpoint defines),
  "added_tokens": {content: id} (the tokenizer's special added tokens),
  "stop_token_ids": [ids generation stops at]}
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from stages.lib.packaging import layout
from stages.lib.packaging.sources import read_json
from stages.lib.parity.metrics import MIN_PROB_LEAD

ROLE_TOKENS = ("bos_token", "eos_token", "pad_token", "unk_token")
CONFIG_TOKENS = ("image_token", "video_token", "vision_start_token", "vision_end_token")


def dump(doc: Any) -> bytes:
    """The one JSON encoding of every package document (stable: same doc, same bytes)."""
    return (json.dumps(doc, indent=1, ensure_ascii=True) + "\n").encode()


def digest_params(params: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of the params the package stage is keyed on."""
    return hashlib.sha256(json.dumps(params, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _token_text(v: Any) -> str | None:
    if isinstance(v, dict):  # {"content": "<|im_end|>", "lstrip": ...} (special_tokens_map / AddedToken)
        v = v.get("content")
    return v if isinstance(v, str) else None


def _vocab_lookup(tok: Mapping[str, Any]) -> dict[str, int]:
    """content -> id over the tokenizer.json's added tokens and its model vocabulary."""
    out: dict[str, int] = {}
    vocab = (tok.get("model") or {}).get("vocab")
    if isinstance(vocab, dict):  # BPE / WordPiece / WordLevel
        out |= {str(k): int(v) for k, v in vocab.items()}
    elif isinstance(vocab, list):  # Unigram: [[piece, score], ...]
        out |= {str(p[0]): i for i, p in enumerate(vocab) if p}
    out |= {str(t["content"]): int(t["id"]) for t in tok.get("added_tokens") or [] if "content" in t and "id" in t}
    return out


def _ids(v: Any) -> list[int]:
    return [int(x) for x in v] if isinstance(v, list) else ([int(v)] if isinstance(v, int) else [])


def special_tokens(ckpt: Path | None) -> tuple[dict[str, int], dict[str, int], list[int]]:
    """(role -> id, special added token -> id, stop token ids) from the checkpoint's tokenizer
    files and config; empty for a model without a tokenizer."""
    if ckpt is None:
        return {}, {}, []
    tok = read_json(ckpt / "tokenizer.json") or {}
    tcfg = read_json(ckpt / "tokenizer_config.json") or {}
    smap = read_json(ckpt / "special_tokens_map.json") or {}
    config = read_json(ckpt / "config.json") or {}
    gen = read_json(ckpt / layout.GENERATION_CONFIG) or {}
    text_cfg = config.get("text_config") or config
    lookup = _vocab_lookup(tok)
    added = {str(t["content"]): int(t["id"]) for t in tok.get("added_tokens") or []
             if t.get("special") and "content" in t and "id" in t}
    added_tcfg = tcfg.get("added_tokens_decoder") or {}  # {id: {"content", "special"}} (tokenizer_config)
    added |= {str(v["content"]): int(k) for k, v in added_tcfg.items()
              if isinstance(v, dict) and v.get("special") and str(v.get("content")) not in added}
    roles: dict[str, int] = {}
    for r in ROLE_TOKENS:
        text = _token_text(tcfg.get(r)) or _token_text(smap.get(r))
        if text is not None and text in {**lookup, **added}:
            roles[r] = {**lookup, **added}[text]
            continue
        ids = _ids(gen.get(f"{r}_id")) or _ids(text_cfg.get(f"{r}_id")) or _ids(config.get(f"{r}_id"))
        if ids:
            roles[r] = ids[0]
    for r in CONFIG_TOKENS:
        v = config.get(f"{r}_id", text_cfg.get(f"{r}_id"))
        if isinstance(v, int):
            roles[r] = v
    stop = sorted({*_ids(gen.get("eos_token_id")), *_ids(text_cfg.get("eos_token_id")),
                   *([roles["eos_token"]] if "eos_token" in roles else [])})
    return dict(sorted(roles.items())), dict(sorted(added.items(), key=lambda kv: kv[1])), stop


def rope(ckpt: Path | None) -> dict[str, Any] | None:
    """The text model's M-RoPE layout (the sections the decoder graph interleaves in-graph)."""
    config = read_json(ckpt / "config.json") if ckpt is not None else None
    if not config:
        return None
    tc = config.get("text_config") or config
    rp = tc.get("rope_parameters") or tc.get("rope_scaling") or config.get("rope_scaling") or {}
    if "mrope_section" not in rp:
        return None
    return {"mrope_section": [int(s) for s in rp["mrope_section"]],
            "mrope_interleaved": bool(rp.get("mrope_interleaved", False)),
            "rope_theta": float(rp.get("rope_theta") or tc.get("rope_theta") or config.get("rope_theta") or 10000.0),
            "rope_type": str(rp.get("rope_type") or rp.get("type") or "default")}


def runtime_doc(family: str, specs: Mapping[str, Mapping[str, Any]], ckpt: Path | None) -> dict[str, Any]:
    vision = specs["vision"]
    decoder = specs.get("decoder") or {}
    roles, added, stop = special_tokens(ckpt)
    return {
        "format": layout.FORMAT_VERSION,
        "family": family,
        "graphs": {g: dict(s) for g, s in specs.items()},
        "text": decoder.get("host"),
        "rope": rope(ckpt) if "decoder" in specs else None,
        "vision": vision.get("spec"),
        "preprocess": None if vision.get("spec") else {k: vision[k] for k in ("layout", "preprocess") if k in vision},
        "generation": read_json(ckpt / layout.GENERATION_CONFIG) if ckpt is not None else None,
        "special_tokens": roles,
        "added_tokens": added,
        "stop_token_ids": stop,
    }


def probe_doc(npz: Path, reference: Mapping[str, Any], precision: Mapping[str, str],
              gates: Mapping[str, Mapping[str, Any]], noise: float = 0.0) -> dict[str, Any]:
    """probe.json: the arrays of probe.npz by sample (inputs vs reference outputs, dtype and
    shape), the reference's description, and each graph's precision and gate."""
    import numpy as np

    arrays: dict[str, dict[str, Any]] = {}
    with np.load(npz, allow_pickle=False) as z:
        for key in sorted(z.files):
            a = z[key]
            arrays[key] = {"dtype": str(a.dtype), "shape": list(a.shape)}
    names = sorted({k.split(".", 1)[1] for k in arrays})
    graded = {g: p for g, p in precision.items() if g in ("vision", "decoder")}
    return {
        "format": layout.FORMAT_VERSION,
        "npz": Path(layout.PROBE_NPZ).name,
        "key": "s{i}.{name}",
        "samples": len(reference.get("samples") or []),
        "inputs": [n for n in names if not layout.is_probe_output(n)],
        "outputs": [n for n in names if layout.is_probe_output(n)],
        "arrays": arrays,
        "compare": {"vision": "hostside.vision.vision_inputs(spec, pixel_values, image_grid_thw) -> image_features "
                              "vs vision_features",
                    "decoder": "inputs_embeds, attention_mask, position_ids, empty past -> logits vs logits",
                    "generation": "greedy from the prompt (no EOS stop): tokens vs generated"},
        "gates": {g: {"precision": p, "gate": dict(gates[p]) if p in gates else None} for g, p in graded.items()},
        # top1 / tokens count the decisive positions only (stages.lib.parity.metrics.decisive)
        "decisive": {"noise": noise, "min_prob_lead": MIN_PROB_LEAD,
                     "rule": "reference lead (top-1 minus top-2 logit) > 2 x noise, the unquantized export's worst "
                             "logit error, and probability lead >= min_prob_lead; generation: up to the first divergence"},
        "reference": dict(reference),
    }


def manifest_doc(*, name: str, family: str, config_digest: str, target: Mapping[str, Any],
                 compat: Mapping[str, bool], precision: Mapping[str, str], graphs: list[str],
                 onnx: Mapping[str, Any], files: Mapping[str, Mapping[str, Any]], parity: Any,
                 notes: list[str], created_by: str) -> dict[str, Any]:
    doc = {
        "format": layout.FORMAT_VERSION, "name": name, "family": family, "config_digest": config_digest,
        "target": {k: target.get(k) for k in layout.TARGET_KEYS},
        "compat": {k: bool(compat[k]) for k in layout.COMPAT_KEYS},
        "precision": {g: precision[g] for g in ("vision", "decoder", "kv_cache") if g in precision},
        "graphs": list(graphs), "onnx": dict(onnx),
        "files": {k: dict(files[k]) for k in sorted(files)},
        "parity": parity, "notes": list(notes), "created_by": created_by,
    }
    assert tuple(doc) == layout.MANIFEST_KEYS
    return doc
