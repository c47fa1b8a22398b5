"""Files on disk, without torch: whether a weights file is whole, and writing so that no reader sees half.

Torch-free on purpose: the config checks a model folder's weights before any model (or torch) loads.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Callable
from pathlib import Path


def safetensors_problem(path: Path) -> str | None:
    """What is wrong with a safetensors file, or None; reads only its header.

    The format is an 8-byte little-endian header length, a JSON header naming each tensor's byte
    range, then the data: a truncated or foreign file fails one of those checks.
    """
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            head = handle.read(8)
            if len(head) < 8:
                return "too short to be a safetensors file"
            (length,) = struct.unpack("<Q", head)
            if length > size - 8:
                return "its header runs past the end of the file"
            header = json.loads(handle.read(length))
    except (OSError, ValueError, UnicodeDecodeError) as err:
        return f"its header cannot be read ({type(err).__name__})"
    if not isinstance(header, dict):
        return "its header is not a table of tensors"
    ends = [
        entry["data_offsets"][1]
        for name, entry in header.items()
        if name != "__metadata__" and isinstance(entry, dict) and "data_offsets" in entry
    ]
    if 8 + length + max(ends, default=0) != size:
        return f"the file is {size} bytes, its header describes {8 + length + max(ends, default=0)}"
    return None


def weights_problem(folder: Path) -> str | None:
    """The first damaged weights file of a model folder, said in words, or None if all are whole.

    A LoRA adapter folder (adapter_config.json) must also hold its adapters' weights.
    """
    folder = Path(folder)
    for file in sorted(folder.glob("*.safetensors")):
        problem = safetensors_problem(file)
        if problem:
            return f"{file} is damaged or incomplete ({problem})"
    if (folder / "adapter_config.json").is_file() and not (folder / "adapter_model.safetensors").is_file():
        return f"{folder} has an adapter_config.json but no adapter_model.safetensors"
    return None


def atomic_write(path: Path, write: Callable[[Path], object]) -> Path:
    """`write(staging)` then rename over `path`: a reader sees the old file or the new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.tmp")
    try:
        write(staging)
        os.replace(staging, path)
    finally:
        if staging.exists():
            staging.unlink()
    return path


def replace_dir(staging: Path, target: Path) -> None:
    """Swap the folder `staging` into `target`; the old `target` stays whole until the new one is in place."""
    if target.exists():
        old = target.with_name(f".{target.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
        os.replace(staging, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, target)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    """One JSON object per line, written to a temporary file and renamed: a reader never sees half a dataset."""
    return atomic_write(path, lambda staging: staging.write_text("".join(json.dumps(row) + "\n" for row in rows)))
