"""The building blocks every section of the build config is made of.

A frozen, closed base model (unknown keys are errors, a loaded config never changes), the
validated field types the sections share (a positive [height, width], a non-empty list of them,
a positive float) and the validator that resolves a path against the folder of the YAML file
that names it (as DVC does), never the CWD. Kept apart from the sections themselves
(``pipeline.config``) so other frozen records (``pipeline.targets``) build on the same base
without reading the whole schema.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo


def _positive_hw(v: tuple[int, int]) -> tuple[int, int]:
    if v[0] <= 0 or v[1] <= 0:
        raise ValueError(f"expected a positive [height, width] in pixels, got {list(v)}")
    return v


def _not_empty(v: tuple[Any, ...]) -> tuple[Any, ...]:
    if not v:
        raise ValueError("expected at least one [height, width], got []")
    return v


HW = Annotated[tuple[int, int], AfterValidator(_positive_hw)]
HWs = Annotated[tuple[HW, ...], AfterValidator(_not_empty)]
PosFloat = Annotated[float, Field(gt=0)]


class Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def resolve_path(v: Any, info: ValidationInfo) -> Any:
    """A ``mode="before"`` field validator: a relative path joined to the YAML file's folder
    (``base_dir`` in the validation context), ``~`` expanded; None stays None."""
    if v is None:
        return None
    base = (info.context or {}).get("base_dir")
    p = Path(v).expanduser()
    return (Path(base) / p).resolve() if base and not p.is_absolute() else p
