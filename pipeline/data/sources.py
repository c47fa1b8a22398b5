"""Raw rows from wherever a `SourceConfig` points: the built-in task, a local file, or the hub.

Every row comes back as a plain dict with an added `"_id"`, so that a dropped row can be named
in the ledger and a held-out row stays held out whatever else changes. Local files are read with
the standard library (and pyarrow for parquet) rather than `datasets.load_dataset`, which would
write a cache beside every file a user points at.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import zlib
from collections.abc import Iterator
from itertools import islice
from pathlib import Path
from typing import IO

from pipeline.config import SourceConfig
from pipeline.data.records import DataError

BUILTIN_SENTIMENT = "builtin:sentiment"
BUILTIN_DIALOGUES = "builtin:dialogues"
BUILTIN_SPLITS = {BUILTIN_SENTIMENT: ("train", "test"), BUILTIN_DIALOGUES: ("train", "test", "gatt", "heldout")}
LOCAL_SUFFIXES = (".jsonl.gz", ".json.gz", ".csv.gz", ".jsonl", ".json", ".csv", ".parquet")


def read_rows(source: SourceConfig) -> list[dict]:
    """The first `source.max_rows` rows of a source (all when None), each with a string `_id`.

    A row without an `id` column is named by position: `"{file name}:{index}"` for a local file
    (the name alone, so that `data/x.jsonl` and `/abs/data/x.jsonl` name, and hold out, the same
    rows) and `"{hub id}:{index}"` for a hub dataset.
    """
    if source.path.startswith("builtin:"):
        rows, stem = _read_builtin(source), source.path
    elif is_local(source.path):
        rows, stem = _read_local(Path(source.path), source.max_rows), Path(source.path).name
    else:
        rows, stem = _read_hub(source), source.path
    return [_with_id(row, stem, i) for i, row in enumerate(rows)]


def is_local(path: str) -> bool:
    """A path is a local file when it has a suffix we read or names something that exists."""
    return path.endswith(LOCAL_SUFFIXES) or Path(path).exists()


def _with_id(row: dict, stem: str, index: int) -> dict:
    """The row's own `id` when it has one (stable across files), else its position in the source."""
    own = row.get("id")
    return {**row, "_id": str(own) if own is not None else f"{stem}:{index}"}


def _read_builtin(source: SourceConfig) -> list[dict]:
    if source.path not in BUILTIN_SPLITS:
        raise DataError(f"{source.path}: unknown built-in source; the built-in ones are {', '.join(BUILTIN_SPLITS)}")
    splits = BUILTIN_SPLITS[source.path]
    if source.split not in splits:
        raise DataError(f"{source.path}: no split '{source.split}'; valid splits: {', '.join(splits)}")
    # generating a corpus is only paid for when used
    if source.path == BUILTIN_DIALOGUES:
        from pipeline.data import builtin_dialogues

        return builtin_dialogues.load_rows(source.split, n=source.max_rows)
    from pipeline.data import builtin_sentiment

    return builtin_sentiment.load_rows(source.split, n=source.max_rows)


def _read_local(path: Path, max_rows: int | None) -> list[dict]:
    if not path.exists():
        raise DataError(f"{path}: no such file")
    name = path.name
    if not path.is_file() or not name.endswith(LOCAL_SUFFIXES):
        raise DataError(f"{path}: not a file of a type read here ({', '.join(LOCAL_SUFFIXES)})")
    if name.endswith(".parquet"):
        return _read_parquet(path, max_rows)
    try:
        with _open_text(path) as handle:
            rows = csv.DictReader(handle) if name.endswith((".csv", ".csv.gz")) else _json_rows(handle, path)
            return list(islice(rows, max_rows))
    except (OSError, UnicodeDecodeError, csv.Error, zlib.error) as err:  # a corrupt gzip, bad bytes, a broken quote
        raise DataError(f"{path}: cannot read: {err}") from None
    except EOFError:  # a truncated gzip; left alone, click would turn it into a bare "Aborted."
        raise DataError(f"{path}: the compressed file ends early (truncated); download or write it again") from None


def _open_text(path: Path) -> IO[str]:
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


def _json_rows(handle: IO[str], path: Path) -> Iterator[dict]:
    """A `.json` file may hold one list of objects or, like `.jsonl`, one object per line."""
    if ".jsonl" not in path.name:
        text = handle.read()
        if text.lstrip().startswith("["):
            try:
                rows = json.loads(text)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}: not valid JSON at line {err.lineno}: {err.msg}") from None
            for i, row in enumerate(rows):
                yield _as_object(row, path, f"item {i}")
            return
        handle = io.StringIO(text)
    for lineno, line in enumerate(handle, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}: line {lineno}: not valid JSON: {err.msg}") from None
        yield _as_object(row, path, f"line {lineno}")


def _as_object(row: object, path: Path, where: str) -> dict:
    if not isinstance(row, dict):
        raise DataError(f"{path}: {where}: expected a JSON object, got {type(row).__name__}")
    return row


def _read_parquet(path: Path, max_rows: int | None) -> list[dict]:
    import pyarrow
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (OSError, pyarrow.ArrowException) as err:
        raise DataError(f"{path}: cannot read parquet: {err}") from None
    return (table if max_rows is None else table.slice(0, max_rows)).to_pylist()


def _read_hub(source: SourceConfig) -> list[dict]:
    """A hub dataset through `datasets`, which caches it; without network, one line saying so."""
    import datasets
    from datasets.exceptions import DatasetNotFoundError

    try:
        dataset = datasets.load_dataset(source.path, name=source.name, data_dir=source.data_dir, split=source.split)
    except DatasetNotFoundError:
        raise DataError(
            f"{source.path}: not a local file (none with a suffix of {', '.join(LOCAL_SUFFIXES)}) "
            "and no such dataset on the Hugging Face hub"
        ) from None
    except ConnectionError:
        raise DataError(
            f"{source.path}: the Hugging Face hub could not be reached; point data.*.path at a local "
            f"file ({', '.join(LOCAL_SUFFIXES)}) or run where the hub is reachable"
        ) from None
    if source.max_rows is not None:
        dataset = dataset.select(range(min(source.max_rows, len(dataset))))
    return dataset.to_list()
