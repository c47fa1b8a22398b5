"""Files on disk, without torch: whether a weights file is whole, and writing so that no reader sees half.

Torch-free on purpose: the config checks a model folder's weights before any model (or torch) loads.
"""

from __future__ import annotations

import json
import struct
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
    ends = [entry["data_offsets"][1] for name, entry in header.items()
            if name != "__metadata__" and isinstance(entry, dict) and "data_offsets" in entry]
    if 8 + length + max(ends, default=0) != size:
        return f"the file is {size} bytes, its header describes {8 + length + max(ends, default=0)}"
    return None


def weights_problem(folder: Path) -> str | None:
    """The first damaged weights file of a model folder, said in words, or None if all are whole."""
    for file in sorted(Path(folder).glob("*.safetensors")):
        problem = safetensors_problem(file)
        if problem:
            return f"{file} is damaged or incomplete ({problem})"
    return None
