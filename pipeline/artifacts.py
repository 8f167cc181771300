"""Where vlmforge keeps what it makes: the artifacts root.

``VLMFORGE_ARTIFACTS`` (default ``./artifacts``) holds ``cache/`` (the content-addressed store),
``runs/<name>/`` (reports), ``locks/<name>.lock``, ``out/<name>/`` and ``packages/``. Every
command resolves the root here, so the build and the cache-maintenance commands always agree
on which tree they work in.
"""

from __future__ import annotations

import os
from pathlib import Path


def artifacts_root() -> Path:
    return Path(os.environ.get("VLMFORGE_ARTIFACTS", "artifacts")).resolve()
