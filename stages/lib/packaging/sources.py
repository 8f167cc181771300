"""Reading the build folders a package is made of (engine@T, quantize@T, checkpoint, reference,
verify@T): which graphs were built, the engines' sidecars and compatibility flags, the graphs'
io specs, the checkpoint's tokenizer/processor files and the held-out reference set.

Stage modules do not import each other, so the few formats of other stages read here are read
directly from their documented files (docs/CONTRACT.md), not through the stage modules.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.stage import StageError
from stages.lib.packaging import layout
from stages.lib.reference_io import META as REFERENCE_JSON
from stages.lib.reference_io import NPZ as REFERENCE_NPZ

VERIFY_JSON = "verify.json"


@dataclass(frozen=True)
class BuildFolders:
    """The output folders of one target's build (read-only)."""

    engine: Path
    quantize: Path
    checkpoint: Path
    reference: Path
    verify: Path | None = None

    @staticmethod
    def from_inputs(inputs: Mapping[str, Path]) -> BuildFolders:
        """From a stage context's ``inputs`` (dep stage name -> folder)."""
        return BuildFolders(engine=Path(inputs["engine"]), quantize=Path(inputs["quantize"]),
                            checkpoint=Path(inputs["checkpoint"]), reference=Path(inputs["reference"]),
                            verify=Path(inputs["verify"]) if inputs.get("verify") else None)


def read_json(path: Path) -> Any:
    """A JSON file's content, or None when there is no such file."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise StageError(f"{path}: not readable JSON ({e})") from e


def built_graphs(engine_dir: Path) -> list[str]:
    """The graphs the engine stage built, in ``layout.GRAPHS`` order; refuses a folder without
    the required ones or with an engine whose sidecar or layer report is missing."""
    graphs = [g for g in layout.GRAPHS if (engine_dir / f"{g}.engine").is_file()]
    missing = [g for g in layout.REQUIRED_GRAPHS if g not in graphs]
    if missing:
        raise StageError(f"{engine_dir}: no {', '.join(g + '.engine' for g in missing)} (is it an engine stage output?)")
    for g in graphs:
        for suffix in layout.ENGINE_SUFFIXES[1:]:
            if not (engine_dir / f"{g}{suffix}").is_file():
                raise StageError(f"{engine_dir}: {g}.engine has no {g}{suffix}")
    return graphs


def sidecars(engine_dir: Path, graphs: list[str]) -> dict[str, dict[str, Any]]:
    return {g: read_json(engine_dir / f"{g}.engine.json") for g in graphs}


def engine_compat(sidecar: Mapping[str, Any]) -> dict[str, bool]:
    """The compatibility flags an engine was built with, from its sidecar's applied options
    (an option asked for but unavailable on the builder is not applied and reads False)."""
    applied = [str(a) for a in (sidecar.get("options") or {}).get("applied") or []]
    return {"hardware_compatible": any(a.startswith("hardware_compatibility_level") for a in applied),
            "version_compatible": "VERSION_COMPATIBLE" in applied,
            "weight_stripped": "STRIP_PLAN" in applied}


def package_compat(cars: Mapping[str, Mapping[str, Any]]) -> tuple[dict[str, bool], list[str]]:
    """The package's flags: hardware/version compatible when every engine is, weight-stripped
    when any is; plus notes where the engines differ."""
    per = {g: engine_compat(c) for g, c in cars.items()}
    out = {"hardware_compatible": all(p["hardware_compatible"] for p in per.values()),
           "version_compatible": all(p["version_compatible"] for p in per.values()),
           "weight_stripped": any(p["weight_stripped"] for p in per.values())}
    notes = [f"{k}: only {', '.join(g for g, p in per.items() if p[k])}"
             for k in layout.COMPAT_KEYS if len({p[k] for p in per.values()}) > 1]
    return out, notes


def io_specs(quantize_dir: Path, graphs: list[str]) -> dict[str, dict[str, Any]]:
    """Each graph's io spec: ``<g>.json`` of the quantize folder (the embed graph's is nested in
    decoder.json when the exporter wrote no embed.json)."""
    specs: dict[str, dict[str, Any]] = {}
    for g in graphs:
        spec = read_json(quantize_dir / f"{g}.json")
        if spec is None and g == "embed":
            spec = (read_json(quantize_dir / "decoder.json") or {}).get("embed")
        if not spec:
            raise StageError(f"{quantize_dir}: no io spec for {g} ({g}.json)")
        specs[g] = spec
    return specs


def precisions(quantize_dir: Path, cars: Mapping[str, Mapping[str, Any]]) -> dict[str, str]:
    """The precision each graph was quantized to (quantize.json, else the engine sidecar), and
    ``kv_cache`` when the decoder's cache is quantized (qdq.kv_cache): the labels a device reads."""
    q = read_json(quantize_dir / "quantize.json") or {}
    out = {g: str((q.get(g) or {}).get("precision") or cars[g].get("precision") or "fp16") for g in cars}
    kv = str(((q.get("decoder") or {}).get("kv_cache") or {}).get("precision", "fp16"))
    return out | ({"kv_cache": kv} if kv not in ("fp16", "fp32") and "decoder" in cars else {})


def onnx_files(quantize_dir: Path, graphs: list[str]) -> list[Path]:
    """The quantized graphs and their io specs, as the quantize folder holds them."""
    files = [quantize_dir / f"{g}{s}" for g in graphs for s in layout.ONNX_SUFFIXES]
    if not (quantize_dir / "vision.onnx").is_file():
        raise StageError(f"{quantize_dir}: no vision.onnx (is it a quantize stage output?)")
    return [f for f in files if f.is_file()]


def checkpoint_path(checkpoint_dir: Path) -> tuple[Path | None, str]:
    """(the checkpoint folder, or None for a bring-your-own ONNX; the family)."""
    meta = read_json(checkpoint_dir / "checkpoint.json")
    if meta is None:
        raise StageError(f"{checkpoint_dir} has no checkpoint.json (is it a checkpoint stage output?)")
    if meta.get("path") is None:
        return None, str(meta.get("family"))
    from stages.lib.checkpoints.local import resolve_checkpoint

    return resolve_checkpoint(checkpoint_dir)


def tokenizer_files(ckpt: Path | None) -> list[Path]:
    """The tokenizer, chat template and processor files plus generation_config.json."""
    if ckpt is None:
        return []
    from stages.lib.checkpoints.local import checkpoint_files

    files = checkpoint_files(ckpt, roles=("tokenizer", "processor"))
    gen = ckpt / layout.GENERATION_CONFIG
    return sorted([*files, *([gen] if gen.is_file() else [])], key=lambda p: p.name)


def reference_files(reference_dir: Path) -> tuple[Path, dict[str, Any]]:
    """(reference.npz, reference.json's content) of the reference stage's folder."""
    npz, meta = reference_dir / REFERENCE_NPZ, read_json(reference_dir / REFERENCE_JSON)
    if meta is None or not npz.is_file():
        raise StageError(f"{reference_dir}: expected {REFERENCE_NPZ} and {REFERENCE_JSON} (a reference stage output)")
    return npz, meta


def verify_doc(verify_dir: Path | None) -> dict[str, Any] | None:
    return None if verify_dir is None else read_json(verify_dir / VERIFY_JSON)
