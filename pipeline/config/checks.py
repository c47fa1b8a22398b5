"""The checks a config's `check()` runs that look past one value: model folders, lengths, names.

Torch-free: a bad config fails here in a fraction of a second, before anything heavy is imported.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.errors import ConfigError

if TYPE_CHECKING:
    from pipeline.config.schema import ModelConfig


def looks_local(path: str) -> bool:
    """A filesystem path rather than a hub id ("gpt2", "org/name")."""
    return path.startswith(("/", ".", "~")) or path.count("/") > 1 or Path(path).exists()


def check_model_path(at: str, path: str) -> None:
    """A local model folder must exist and hold whole weights before anything loads; a hub id is left to the hub."""
    if not looks_local(path):
        return
    folder = Path(path).expanduser()
    if not (folder / "config.json").is_file() and not (folder / "adapter_config.json").is_file():
        raise ConfigError(f"{at}: no model folder at {path} (is the stage that writes it done?)")
    from pipeline.files import weights_problem

    problem = weights_problem(folder)
    if problem:
        raise ConfigError(f"{at}: {problem}; re-run the stage that wrote it (or point at another model)")


def local_model_config(path: str) -> dict | None:
    """The config.json of a local model folder (None for a hub id, checked when it loads)."""
    file = Path(path).expanduser() / "config.json"
    if not looks_local(path) or not file.is_file():
        return None
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ConfigError(f"{file}: not a valid JSON model config; re-run the stage that wrote it") from None


def check_reward_model_path(at: str, path: str) -> None:
    """A reward model must be a sequence classifier with one label: a causal LM would get a random head."""
    check_model_path(at, path)
    config = local_model_config(path)
    if config is None:
        return
    architectures = config.get("architectures") or ["an unknown architecture"]
    labels = len(config.get("id2label") or {}) or config.get("num_labels")
    if not any(str(a).endswith("ForSequenceClassification") for a in architectures) or labels != 1:
        raise ConfigError(
            f"{at}: {path} is not a reward model ({architectures[0]} with {labels or 'no'} label(s); a reward model "
            "is a sequence classifier with one label, as `rlhfdpo reward` writes)"
        )


def check_fits(at: str, model: ModelConfig, length: int, what: str) -> None:
    """`length` tokens (prompt and response) must fit the model's positions, when they are known."""
    if model.name_or_path == "scratch":
        positions = model.architecture.n_positions
    else:
        config = local_model_config(model.name_or_path) or {}
        positions = config.get("n_positions") or config.get("max_position_embeddings")
    if positions and length > positions:
        raise ConfigError(f"{at}: {what} is {length} tokens, more than the model's {positions} positions")


def check_gold(at: str, name: str) -> None:
    from pipeline.judges import GOLD_REWARDS, is_known_gold

    if not is_known_gold(name):
        raise ConfigError(f"{at}: unknown '{name}'; known: {', '.join(GOLD_REWARDS)} or hf:<classifier id>")


def positive(at: str, **values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise ConfigError(f"{at}.{name}: must be at least 1, got {value}")


def in_range(at: str, value: float, lo: float, hi: float) -> None:
    if not lo <= value <= hi:
        raise ConfigError(f"{at}: must be between {lo} and {hi}, got {value}")
