"""Strict loading: YAML plus `--set a.b=value` overrides into a checked config.

`load_config(StageConfig, path, overrides)` reads the YAML with `yaml.safe_load`, applies the
overrides, and builds the tree, failing with one `ConfigError` line that names the file and the key
path for: an unknown key (with the closest valid key), a wrong type (with the expected type), or an
impossible value. All of that happens before any model or dataset is touched.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from pipeline.errors import ConfigError


def load_config(cls: type, path: str | Path, overrides: list[str] | None = None) -> Any:
    """Read a stage config strictly; see the module docstring for what is checked."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"{path}: not UTF-8 text (byte {err.start} cannot be decoded); save the config as UTF-8"
        ) from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or "invalid YAML"
        raise ConfigError(f"{path}: not valid YAML{where}: {problem}") from None
    if raw is None:
        raise ConfigError(f"{path}: the file is empty; expected a mapping of config sections")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of config sections, got {type(raw).__name__}")
    for override in overrides or []:
        _apply_override(raw, override, path)
    try:
        return config_from_dict(cls, raw)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


def config_from_dict(cls: type, raw: dict, overrides: list[str] | None = None, check: bool = True) -> Any:
    """A config from a mapping (what a YAML file holds) and `--set` overrides; checked unless asked not to.

    Unchecked, it is the defaults as written, before any model path is looked at (`config show`).
    """
    raw = dict(raw)
    for override in overrides or []:
        _apply_override(raw, override, Path("--set"))
    config = _build(cls, raw, "")
    if check:
        config.check()
    return config


def _apply_override(raw: dict, override: str, path: Path) -> None:
    key, sep, text = override.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set {override}: expected key.path=value")
    try:
        value = yaml.safe_load(text) if text else ""
    except yaml.YAMLError as err:
        problem = getattr(err, "problem", None) or "invalid YAML"
        raise ConfigError(
            f"--set {override}: the value is not valid YAML ({problem}); quote it or fix the brackets"
        ) from None
    parts = key.split(".")
    node: Any = raw
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"--set {key}: {'.'.join(parts[:i])} has no item {part}")
            node = node[int(part)]
        else:
            node = node.setdefault(part, {})
        if not isinstance(node, (dict, list)):
            raise ConfigError(f"--set {key}: {'.'.join(parts[: i + 1])} is not a section")
    last = parts[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise ConfigError(f"--set {key}: no item {last}")
        node[int(last)] = value
    else:
        node[last] = value


def _build(cls: type, raw: Any, at: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{at or 'top level'}: expected a mapping, got {_describe(raw)}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in raw:
        if key not in names:
            where = f"{at}.{key}" if at else str(key)
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
            hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(names)}"
            raise ConfigError(f"{where}: unknown key{hint}")
    kwargs = {key: _coerce(hints[key], value, f"{at}.{key}" if at else key) for key, value in raw.items()}
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, at: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:
            return _coerce(options[0], value, at)
        raise ConfigError(f"{at}: unsupported union type")  # pragma: no cover - not used by configs
    if value is None:
        raise ConfigError(f"{at}: expected {_type_name(hint)}, got null")
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, at)
    if origin is Literal:
        if value not in args:
            close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1, cutoff=0.5)
            hint_text = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"{at}: expected one of {', '.join(map(str, args))}, got {value!r}{hint_text}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{at}: expected a list, got {_describe(value)}")
        return [_coerce(args[0], item, f"{at}.{i}") for i, item in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{at}: expected a mapping, got {_describe(value)}")
        return {_coerce(args[0], k, at): _coerce(args[1], v, f"{at}.{k}") for k, v in value.items()}
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{at}: expected true or false, got {_describe(value)}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{at}: expected an integer, got {_describe(value)}")
        return value
    if hint is float:
        if isinstance(value, str):  # YAML reads 1e-5 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{at}: expected a number, got {_describe(value)}")
        if not math.isfinite(value):  # YAML's .inf and .nan would train a NaN model with exit 0
            raise ConfigError(f"{at}: expected a finite number, got {value}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{at}: expected a string, got {_describe(value)}")
        return value
    raise ConfigError(f"{at}: unsupported type {hint}")  # pragma: no cover


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {value!r}" if not isinstance(value, (dict, list)) else type(value).__name__


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", str(hint))


# ----------------------------------------------------------------------------------------- writing


def to_dict(config: Any) -> dict:
    return dataclasses.asdict(config)


def digest(config: Any) -> str:
    """Short stable hash of a resolved config, for run cards and reuse checks."""
    text = json.dumps(to_dict(config), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def write_resolved(config: Any, run_dir: Path) -> Path:
    """Write config.yaml with every default filled in."""
    run_dir.mkdir(parents=True, exist_ok=True)
    target = run_dir / "config.yaml"
    target.write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
    return target
