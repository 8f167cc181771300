"""Which files of a checkpoint folder define it, by role, the symlink rule, and ``config.json``.

Roles let a stage key its cache entry on only the files it reads: the exporters read the
weights and the image processor, not the tokenizer (``checkpoint_files(ckpt, roles=("model",
"processor"))``). Every file the folder keeps has exactly one role (``file_role``).

Symlinks: a link that resolves outside the checkpoint folder is refused, since its content is
not the checkpoint's (a shared folder could hash, load or publish any file on the machine).
Links inside the folder are fine, and so is a Hugging Face hub cache snapshot
(``<repo>/snapshots/<rev>/``), whose files are links into the same repo's ``blobs/``.

``read_config`` reads ``config.json`` under that rule: every reader of a checkpoint starts
there (family detection, validation, the remote-code policy of ``hf_load``), so it lives with
the file rules rather than with any one of them.
"""

from __future__ import annotations

import fnmatch
import json
from pathlib import Path
from typing import Any

from pipeline.stage import StageError

ROLES = ("model", "tokenizer", "processor")
KEPT_SUFFIXES = (".json", ".safetensors", ".txt", ".model", ".jinja", ".tiktoken")
PROCESSOR_FILES = ("preprocessor_config.json", "video_preprocessor_config.json", "processor_config.json")
# *.model: sentencepiece models (tokenizer.model, spiece.model)
TOKENIZER_PATTERNS = ("tokenizer*.json", "*.model", "vocab.json", "vocab.txt", "merges.txt", "special_tokens_map.json",
                      "added_tokens.json", "chat_template.json", "*.jinja", "*.tiktoken")


def file_role(name: str) -> str:
    """``processor``, ``tokenizer`` or ``model`` (config, weights, index, generation config and
    anything else the folder keeps) for a file name of a checkpoint folder."""
    if name in PROCESSOR_FILES:
        return "processor"
    if any(fnmatch.fnmatchcase(name, pat) for pat in TOKENIZER_PATTERNS):
        return "tokenizer"
    return "model"


def _inside(target: Path, folder: Path) -> bool:
    return target == folder or folder in target.parents


def check_links(path: str | Path) -> None:
    """Refuse a top-level entry of the checkpoint that is a symlink resolving outside it."""
    root = Path(path).resolve()  # the folder itself may be a link (models kept on another disk)
    hub_blobs = (root.parent.parent / "blobs").resolve() if root.parent.name == "snapshots" else None
    for entry in sorted(root.iterdir()):
        if not entry.is_symlink():
            continue
        target = entry.resolve()
        if _inside(target, root) or (hub_blobs is not None and _inside(target, hub_blobs)):
            continue
        raise StageError(f"checkpoint {root}: {entry.name} is a symlink to {target}, outside the checkpoint "
                         "folder; refusing to follow it")


def checkpoint_files(path: str | Path, roles: tuple[str, ...] | None = None) -> list[Path]:
    """The files whose content defines the checkpoint (for cache keys), sorted; only those of
    ``roles`` (see ``ROLES``) when given. Refuses symlinks out of the folder (``check_links``)."""
    root = Path(path)
    unknown = [r for r in roles or () if r not in ROLES]
    if unknown:
        raise ValueError(f"unknown checkpoint file role {unknown[0]!r} (roles: {', '.join(ROLES)})")
    if not root.is_dir():
        raise StageError(f"checkpoint {root} does not exist (expected a local Hugging Face checkpoint folder)")
    check_links(root)
    files = sorted(p for p in root.iterdir() if p.is_file() and p.suffix in KEPT_SUFFIXES)
    return files if roles is None else [p for p in files if file_role(p.name) in roles]


def read_config(path: str | Path) -> dict[str, Any]:
    """config.json of a checkpoint folder (after the symlink rule: see check_links)."""
    cfg_file = Path(path) / "config.json"
    if not cfg_file.is_file():
        raise StageError(f"checkpoint {path} has no config.json (expected a local Hugging Face checkpoint folder)")
    check_links(path)
    try:
        data = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise StageError(f"{cfg_file}: not valid JSON ({e.msg} at line {e.lineno})") from None
    except UnicodeDecodeError:
        raise StageError(f"{cfg_file}: not UTF-8 text (expected a JSON object)") from None
    if not isinstance(data, dict):
        raise StageError(f"{cfg_file}: expected a JSON object")
    return data
