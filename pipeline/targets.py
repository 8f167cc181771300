"""The target catalog (`configs/targets.yaml`): which GPU, which SM, which builder."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError

from pipeline.config import BuildConfig, Frozen, Precision
from pipeline.errors import ConfigError

Builder = Literal["tensorrt-rtx", "tensorrt"]
LOW_PRECISION_ORDER: tuple[Precision, ...] = ("fp8", "int8", "int4-weight", "fp16")


class TargetSpec(Frozen):
    name: str
    sm: str = Field(pattern=r"^\d+\.\d+$")  # compute capability, e.g. "8.9"
    builder: Builder
    precisions: tuple[Precision, ...]
    gpu: str = ""
    notes: str = ""

    @property
    def sm_int(self) -> int:
        major, minor = self.sm.split(".")
        return int(major) * 10 + int(minor)

    def resolve_precision(self, wanted: Precision) -> tuple[Precision, str | None]:
        """The precision to build and, when `best` chose or fell back, why (for the report)."""
        if wanted == "best":
            for p in LOW_PRECISION_ORDER:
                if p in self.precisions and p != "int4-weight":
                    return p, f"best on {self.name} (SM {self.sm}) is {p}"
            return "fp16", f"{self.name} supports no low precision; fp16"
        if wanted not in self.precisions:
            have = ", ".join(self.precisions)
            raise ConfigError(f"target {self.name} (SM {self.sm}) does not support {wanted} (it has: {have})")
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
            if wanted == "best" or wanted in t.precisions:
                continue
            if wanted == "fp8":
                raise ConfigError(
                    f"{config_path}: precision.{graph}: fp8 needs SM >= 8.9 and target {t.name} is SM {t.sm}; "
                    f"targets with FP8: {', '.join(with_fp8(catalog))} (or use precision: best to fall back)"
                )
            raise ConfigError(
                f"{config_path}: precision.{graph}: target {t.name} (SM {t.sm}) does not support {wanted} "
                f"(it has: {', '.join(t.precisions)})"
            )


def with_fp8(catalog: dict[str, TargetSpec]) -> list[str]:
    return sorted(n for n, t in catalog.items() if "fp8" in t.precisions)
