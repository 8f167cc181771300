"""Loading a build config: reading its YAML (``include:`` composition), validating it against
the schema (``pipeline.config``) and the cross-section checks (``pipeline.config_checks``), and
wording what is wrong: one line naming the file, the key path and what was expected, never a
traceback. The schema does not load itself, so neither it nor the checks import each other.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.config import BUILD_NAME, BUILD_NAME_RULE, BuildConfig
from pipeline.config_checks import check_config
from pipeline.errors import ConfigError


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _includes(path: Path, value: Any) -> list[str]:
    if value is None:
        return []
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, list) or not all(isinstance(n, str) and n.strip() for n in names):
        raise ConfigError(f"{path}: include: expected a file name or a list of file names, got {value!r}")
    return names


def read_yaml(path: Path, seen: tuple[Path, ...] = (), included_from: Path | None = None) -> dict[str, Any]:
    """The mapping in ``path``, its includes merged underneath it (later ones win, the file itself last)."""
    import yaml

    if path in seen:
        raise ConfigError(f"{path}: include cycle through {' -> '.join(map(str, seen))}")
    where = f"{included_from}: include: {path}" if included_from else str(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{where}: config file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{where}: is a folder (expected a YAML config file)") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{where}: not a text file (expected a YAML config file)") from None
    except OSError as e:
        raise ConfigError(f"{where}: cannot be read ({e.strerror or e})") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    merged: dict[str, Any] = {}
    for inc in _includes(path, data.pop("include", None)):
        merged = deep_merge(merged, read_yaml((path.parent / Path(inc).expanduser()).resolve(), (*seen, path), path))
    return deep_merge(merged, data)


def loc_str(parts: tuple[Any, ...]) -> str:
    out = ""
    for x in parts:
        out += f"[{x}]" if isinstance(x, int) else (f".{x}" if out else str(x))
    return out or "(top level)"


def format_error(path: Path, err: Any) -> str:
    parts = []
    for e in err.errors():
        loc = loc_str(tuple(e["loc"]))
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif e["type"] == "missing":
            msg = "required key is missing"
        elif "input" in e and e["type"].startswith(("literal", "int", "float", "bool", "string", "greater",
                                                    "less", "too_short", "too_long", "tuple", "list")):
            msg = f"{msg} (got {e['input']!r})"
        parts.append(f"{loc}: {msg}")
    return f"{path}: " + "; ".join(parts)


def load_config(path: str | Path) -> BuildConfig:
    """The build config in ``path`` (includes merged), validated; ConfigError (exit 2) otherwise."""
    from pydantic import ValidationError

    path = Path(path).expanduser().resolve()
    data = read_yaml(path)
    if "name" not in data:
        if not BUILD_NAME.fullmatch(path.stem):
            raise ConfigError(f"{path}: name: not set, and the file name {path.stem!r} is not {BUILD_NAME_RULE}; "
                              "set name: explicitly")
        data["name"] = path.stem
    try:
        cfg = BuildConfig.model_validate(data, context={"base_dir": str(path.parent)})
    except ValidationError as e:
        raise ConfigError(format_error(path, e)) from None
    check_config(cfg, path)
    return cfg
