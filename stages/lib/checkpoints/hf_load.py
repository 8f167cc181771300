"""The one policy for every ``transformers`` ``from_pretrained`` call on a checkpoint.

* Offline: ``local_files_only=True`` (a checkpoint is a local folder; nothing downloads).
* ``trust_remote_code`` comes from ``model.trust_remote_code`` only (default off), and a
  checkpoint that ships its own code (``auto_map``) while it is off is refused with one line
  here, before transformers could raise its multi-line error or prompt on a terminal.
* A file transformers cannot load gives one line naming the checkpoint and what it loads.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.stage import StageError
from stages.lib.checkpoints.files import read_config

# files whose "auto_map" makes transformers import code from the checkpoint folder, by what reads them
_PROCESSOR_MAPS = ("preprocessor_config.json", "processor_config.json")
CODE_MAPS = ("config.json", "tokenizer_config.json", *_PROCESSOR_MAPS, "video_preprocessor_config.json")
_LOAD_ERRORS = (OSError, ValueError, KeyError, ImportError)


def hf_kwargs(trust_remote_code: bool = False) -> dict[str, Any]:
    """Keyword arguments every ``from_pretrained`` on a checkpoint gets."""
    return {"trust_remote_code": bool(trust_remote_code), "local_files_only": True}


def check_remote_code(path: str | Path, trust_remote_code: bool = False,
                      files: tuple[str, ...] = CODE_MAPS) -> None:
    """Refuse a checkpoint with ``auto_map`` (its own Python code) in any of ``files`` (default:
    all that transformers reads it from) unless trust_remote_code is on."""
    root = Path(path)
    read_config(root)  # one-line errors for a missing or broken config.json
    if trust_remote_code:
        return
    for name in files:
        f = root / name
        if not f.is_file():
            continue
        try:
            data = json.loads(f.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise StageError(f"{f}: not valid JSON ({str(e).splitlines()[0]})") from None
        if isinstance(data, dict) and data.get("auto_map"):
            raise StageError(f"checkpoint {root} ships its own code (auto_map in {name}); "
                             "set model.trust_remote_code: true to allow it")


def from_pretrained(cls: Any, path: str | Path, what: str, trust_remote_code: bool = False,
                    files: tuple[str, ...] = ("config.json",), **kwargs: Any) -> Any:
    """``cls.from_pretrained(path)`` under the policy; ``what`` names the object in errors,
    ``files`` are the ones it reads (checked for ``auto_map``)."""
    check_remote_code(path, trust_remote_code, files)
    try:
        return cls.from_pretrained(path, **hf_kwargs(trust_remote_code), **kwargs)
    except _LOAD_ERRORS as e:
        first = (str(e).strip().splitlines() or [""])[0][:300]
        raise StageError(f"checkpoint {path}: cannot load its {what} ({type(e).__name__}: {first})") from None


def load_config_hf(path: str | Path, trust_remote_code: bool = False) -> Any:
    from transformers import AutoConfig

    return from_pretrained(AutoConfig, path, "config (config.json)", trust_remote_code)


def has_image_processor(path: str | Path) -> bool:
    return any((Path(path) / n).is_file() for n in _PROCESSOR_MAPS)


def load_image_processor(path: str | Path, trust_remote_code: bool = False, missing_ok: bool = False) -> Any:
    """The image processor alone (no tokenizer files read); None when the checkpoint has no
    processor files and ``missing_ok``."""
    from transformers import AutoImageProcessor

    files = ("config.json", *_PROCESSOR_MAPS)
    if missing_ok and not has_image_processor(path):
        check_remote_code(path, trust_remote_code, files)
        return None
    return from_pretrained(AutoImageProcessor, path, "image processor (preprocessor_config.json)", trust_remote_code,
                           files)


def load_tokenizer(path: str | Path, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    return from_pretrained(AutoTokenizer, path, "tokenizer", trust_remote_code, ("config.json", "tokenizer_config.json"))


def load_processor(path: str | Path, trust_remote_code: bool = False) -> tuple[Any, Any]:
    """(image processor, tokenizer) of a checkpoint, offline.

    ``AutoProcessor`` is tried first; the Qwen-VL processors also build a video processor
    that needs torchvision, which has no CPU build for torch 2.13 here, so the image
    processor (PIL backend) and the tokenizer are loaded on their own when it fails.
    """
    from transformers import AutoProcessor

    check_remote_code(path, trust_remote_code)
    try:
        proc = AutoProcessor.from_pretrained(path, **hf_kwargs(trust_remote_code))
        return proc.image_processor, proc.tokenizer
    except (ImportError, AttributeError, OSError, ValueError):
        return load_image_processor(path, trust_remote_code), load_tokenizer(path, trust_remote_code)
