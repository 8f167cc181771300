"""The target catalog (`configs/targets.yaml`): which GPU, which SM, which builder."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError

from pipeline.config import BuildConfig, Precision
from pipeline.config_types import Frozen
from pipeline.errors import ConfigError

Builder = Literal["tensorrt-rtx", "tensorrt"]
LOW_PRECISION_ORDER: tuple[Precision, ...] = ("fp8", "int8", "int4-weight", "fp16")


def sm_int(sm: str) -> int:
    """A compute capability as one number: "8.9" -> 89."""
    major, minor = sm.split(".")
    return int(major) * 10 + int(minor)


def precision_refusal(name: str, sm: str, have: tuple[str, ...], wanted: str) -> str | None:
    """Why target ``name`` (SM ``sm``, catalog precisions ``have``) cannot build ``wanted``, or
    None: the one rule behind the config check, ``resolve_precision`` and the engine stage."""
    if wanted == "fp8" and ("fp8" not in have or sm_int(sm) < 89):
        return f"FP8 needs SM >= 8.9 and target {name} is SM {sm}"
    if wanted == "int8" and sm_int(sm) < 75:
        return f"INT8 tensor cores need SM >= 7.5 and target {name} is SM {sm}"
    if wanted not in have:
        return f"target {name} (SM {sm}) does not support {wanted} (it has: {', '.join(have)})"
    return None


class TargetSpec(Frozen):
    name: str
    sm: str = Field(pattern=r"^\d+\.\d+$")  # compute capability, e.g. "8.9"
    builder: Builder
    precisions: tuple[Precision, ...]
    gpu: str = ""
    notes: str = ""

    def resolve_precision(self, wanted: Precision) -> tuple[Precision, str | None]:
        """The precision to build and, when `best` chose or fell back, why (for the report)."""
        if wanted == "best":
            for p in LOW_PRECISION_ORDER:
                if p in self.precisions and p != "int4-weight":
                    return p, f"best on {self.name} (SM {self.sm}) is {p}"
            return "fp16", f"{self.name} supports no low precision; fp16"
        why = precision_refusal(self.name, self.sm, self.precisions, wanted)
        if why:
            raise ConfigError(why)
        return wanted, None


DEFAULT_CATALOG = Path(__file__).resolve().parent.parent / "configs" / "targets.yaml"


def load_catalog(path: Path = DEFAULT_CATALOG) -> dict[str, TargetSpec]:
    import yaml

    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: target catalog not found") from None
    out: dict[str, TargetSpec] = {}
    for name, entry in (raw.get("targets") or {}).items():
        try:
            out[name] = TargetSpec.model_validate({"name": name, **entry})
        except ValidationError as e:
            first = e.errors()[0]
            loc = ".".join(str(x) for x in first["loc"])
            raise ConfigError(f"{path}: targets.{name}.{loc}: {first['msg']}") from None
    return out


def targets_for(cfg: BuildConfig, config_path: Path, catalog: dict[str, TargetSpec]) -> list[TargetSpec]:
    out = []
    for i, name in enumerate(cfg.targets):
        if name not in catalog:
            raise ConfigError(
                f"{config_path}: targets[{i}]: {name!r} is not in the target catalog "
                f"(known: {', '.join(sorted(catalog))})"
            )
        out.append(catalog[name])
    return out


def check_precisions(cfg: BuildConfig, config_path: Path, targets: list[TargetSpec],
                     catalog: dict[str, TargetSpec]) -> None:
    """Refuse, before anything builds, a precision a target cannot run (exit 2)."""
    for graph in ("vision", "decoder"):
        wanted = getattr(cfg.precision, graph)
        for t in targets:
            why = None if wanted == "best" else precision_refusal(t.name, t.sm, t.precisions, wanted)
            if why and wanted == "fp8":
                why += f"; targets with FP8: {', '.join(with_fp8(catalog))} (or use precision: best to fall back)"
            if why:
                raise ConfigError(f"{config_path}: precision.{graph}: {why}")
    for t in targets if cfg.precision.kv_cache == "fp8" else ():
        why = precision_refusal(t.name, t.sm, t.precisions, "fp8")
        if why:
            raise ConfigError(f"{config_path}: precision.kv_cache: an FP8 cache: {why}; "
                              f"targets with FP8: {', '.join(with_fp8(catalog))} (or kv_cache: int8)")


def with_fp8(catalog: dict[str, TargetSpec]) -> list[str]:
    return sorted(n for n, t in catalog.items() if "fp8" in t.precisions)
