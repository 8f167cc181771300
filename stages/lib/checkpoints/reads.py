"""Which files of a user's checkpoint a stage reads, declared as that stage's ``external``.

Each stage that opens the user's folder declares the roles it reads (``model``: config and
weights, ``tokenizer``, ``processor``), so their content enters that stage's own key: editing a
tokenizer in place re-runs exactly the stages that read tokenizers, and none that read only the
weights (DVC's per-stage dependency hashes). A generated checkpoint lives in the checkpoint
stage's cache entry and reaches its readers through that entry's output digests instead.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipeline.config import BuildConfig

ALL_ROLES = ("model", "tokenizer", "processor")


def checkpoint_reads(*roles: str, plus: Callable[[BuildConfig], list[Path]] | None = None
                     ) -> Callable[[BuildConfig], list[Path]]:
    """An ``external`` declaration: the checkpoint files of ``roles`` (and ``plus``'s files)."""
    unknown = set(roles) - set(ALL_ROLES)
    if unknown:
        raise ValueError(f"unknown checkpoint roles {sorted(unknown)} (known: {ALL_ROLES})")

    def external(cfg: BuildConfig) -> list[Path]:
        files = plus(cfg) if plus is not None else []
        if cfg.model.checkpoint is None:
            return files
        from stages.lib.checkpoints.local import checkpoint_files

        return [*files, *checkpoint_files(cfg.model.checkpoint, roles=tuple(roles))]

    return external
