"""A config as commented YAML: `rlhfdpo config show` and `rlhfdpo config new`.

The comments are the ones written beside (or just above) each field in `pipeline/config.py`, so the
schema stays the one place where a key is explained. The YAML written here loads back with
`load_config` into the same config.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import typing
from functools import cache
from typing import Any

import yaml

_FIELD = re.compile(r"^\s+(\w+):\s*[^=]+?(?:=.*?)?(?:\s+#\s*(?P<comment>.*))?$")


@cache
def field_comments(cls: type) -> dict[str, str]:
    """{field name: its comment} from the class source: the trailing `# ...`, else the `#` lines above it.
    A field a config inherits keeps the comment its base class gives it."""
    base = next((b for b in cls.__bases__ if dataclasses.is_dataclass(b)), None)
    comments: dict[str, str] = dict(field_comments(base)) if base is not None else {}
    own = {f.name for f in dataclasses.fields(cls)} - set(comments)
    above: list[str] = []
    for line in inspect.getsource(cls).splitlines()[1:]:
        stripped = line.strip()
        if stripped.startswith("#"):
            above.append(stripped.lstrip("# ").strip())
            continue
        match = _FIELD.match(line) if stripped and not stripped.startswith(("def ", "@", '"""', "return")) else None
        if match and match.group(1) in own and match.group(1) not in comments:
            text = match.group("comment") or " ".join(above)
            if text:
                comments[match.group(1)] = text
        if not stripped.startswith("#"):
            above = []
    return comments


def commented_yaml(config: Any, header: list[str] = ()) -> str:
    """The whole config as YAML, every key that the schema explains with its comment."""
    lines = [f"# {h}" if h else "#" for h in header]
    _emit(config, 0, lines)
    return "\n".join(lines) + "\n"


def _emit(node: Any, indent: int, lines: list[str]) -> None:
    pad = " " * indent
    comments = field_comments(type(node))
    hints = typing.get_type_hints(type(node))
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        note = f"  # {comments[f.name]}" if f.name in comments else ""
        if dataclasses.is_dataclass(value):
            doc = _class_doc(type(value))
            lines.append(f"{pad}{f.name}:{note or (f'  # {doc}' if doc else '')}")
            _emit(value, indent + 2, lines)
        elif isinstance(value, list) and value and all(dataclasses.is_dataclass(v) for v in value):
            lines.append(f"{pad}{f.name}:{note}")
            for item in value:
                item_lines: list[str] = []
                _emit(item, indent + 4, item_lines)
                first = item_lines[0]
                lines.append(f"{pad}  - {first[indent + 4 :]}")
                lines.extend(item_lines[1:])
        elif value is None and dataclasses.is_dataclass(_optional_of(hints[f.name])):
            lines.append(f"{pad}{f.name}: null{note}")
        else:
            lines.append(f"{pad}{f.name}: {_scalar(value)}{note}")


def _class_doc(cls: type) -> str:
    """The first line of a class's own docstring (not the signature dataclasses make up)."""
    doc = (cls.__doc__ or "").strip().split("\n")[0]
    return "" if doc.startswith(f"{cls.__name__}(") else doc


def _optional_of(hint: Any) -> Any:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if len(args) == 1 else None


def _scalar(value: Any) -> str:
    """One value in YAML flow style, on one line."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10**9, sort_keys=False).strip()
    return text[: -len("\n...")] if text.endswith("\n...") else text.removesuffix("...").strip()


# --------------------------------------------------------------------------- rlhfdpo config new


def starting_config(stage: str, model: str, data: str, fmt: str | None, reward: str | None) -> dict:
    """The keys `config new` sets for a user's model and data; everything else keeps its default.

    The data format is read from the file's columns when not given; sequence lengths are fitted
    to the model's positions when its config says how many it has.
    """
    from pipeline.config import SourceConfig, local_model_config
    from pipeline.data.adapters import FORMATS, guess_format
    from pipeline.data.records import DataError
    from pipeline.data.sources import read_rows

    if fmt is None:
        rows = read_rows(SourceConfig(path=data, max_rows=3))
        if not rows:
            raise DataError(f"{data}: no rows to tell the format from; pass --format")
        fmt = guess_format(rows[0])
        if fmt is None:
            columns = ", ".join(k for k in rows[0] if k != "_id")
            raise DataError(
                f"{data}: columns {columns} match no format; pass --format ({', '.join(FORMATS)})"
                " and map columns with data.train.0.columns"
            )
    raw: dict = {
        "output_dir": f"runs/{stage}",
        "model": {"name_or_path": model},
        "data": {"train": [{"path": data, "format": fmt}]},
    }
    positions = None
    if model != "scratch":
        config = local_model_config(model) or {}
        positions = config.get("n_positions") or config.get("max_position_embeddings")
    length = min(256, positions or 256)
    raw["data"] |= {"max_length": length, "max_prompt_length": length // 2}
    if stage == "ppo":
        raw["reward"] = {"kind": "model", "models": [reward]} if reward else {"kind": "gold"}
        raw["rollout"] = {"max_new_tokens": min(48, length // 2)}
    if stage == "pairs":
        raw["sample"] = {"max_new_tokens": min(48, length // 2)}
    return raw
