"""From a `DataConfig` to train and eval records: read every source, adapt, subsample, hold out.

Which rows a run sees is decided by hashing `(data.seed, row id)`, never by shuffling a list:

- `fraction` keeps the first `round(fraction * n)` records of a source in hash order, so the subset
  for 0.1 is inside the subset for 0.2, and adding or removing another source changes nothing.
- Without `data.eval`, a record is held out when its hash falls below `eval_fraction`. That test
  looks at the record alone, so it does not move with `fraction`, `max_rows`, the other sources or
  the stage: the rows an SFT run held out of an HH file are the rows a DPO run holds out of it.

Records come back in source order and, within a source, in file order; the trainer shuffles.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import TypeVar

from pipeline.config import DataConfig, SourceConfig
from pipeline.data.adapters import Render, pair_adapter, prompt_adapter, sft_adapter
from pipeline.data.records import DataError, Drop, DropLedger, PreferencePair, PromptRecord, SFTExample
from pipeline.data.sources import read_rows

R = TypeVar("R", SFTExample, PreferencePair, PromptRecord)


def load_sft_examples(
    data: DataConfig, ledger: DropLedger, render: Render | None = None
) -> tuple[list[SFTExample], list[SFTExample]]:
    """(train, eval) SFT examples; preference sources give (prompt, chosen)."""
    return _load(data, ledger, lambda source: sft_adapter(source, render))


def load_pairs(
    data: DataConfig, ledger: DropLedger, render: Render | None = None
) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """(train, eval) preference pairs; a source in an SFT-only format is a `DataError`."""
    return _load(data, ledger, lambda source: pair_adapter(source, render))


def load_prompts(
    data: DataConfig, ledger: DropLedger, render: Render | None = None
) -> tuple[list[PromptRecord], list[PromptRecord]]:
    """(train, eval) prompts with the dataset's own continuation as reference."""
    return _load(data, ledger, lambda source: prompt_adapter(source, render, data.seed))


def source_label(source: SourceConfig) -> str:
    """How the ledger names a source: its path and split."""
    return f"{source.path}[{source.split}]"


def _load(
    data: DataConfig, ledger: DropLedger, make_adapter: Callable[[SourceConfig], Callable[[dict], R]]
) -> tuple[list[R], list[R]]:
    # Every adapter is built before any row is read, so a format that cannot work fails at once.
    train_adapters = [make_adapter(source) for source in data.train]
    eval_adapters = [make_adapter(source) for source in data.eval]
    train = _mix(data.train, train_adapters, ledger, data.seed)
    if data.eval:
        evaluation = _mix(data.eval, eval_adapters, ledger, data.seed)
    else:
        held_out = [_unit(data.seed, "eval", r.source_id) < data.eval_fraction for r in train]
        evaluation = [r for r, out in zip(train, held_out, strict=True) if out]
        train = [r for r, out in zip(train, held_out, strict=True) if not out]
    if not train:
        raise DataError(
            "no training records left from "
            + ", ".join(source_label(s) for s in data.train)
            + ": "
            + ("; ".join(ledger.summary_lines()) or "the sources are empty")
        )
    if data.max_eval_examples is not None and len(evaluation) > data.max_eval_examples:
        evaluation = _first_by_hash(evaluation, data.max_eval_examples, data.seed, "eval")
    return train, evaluation


def _mix(
    sources: Sequence[SourceConfig], adapters: Sequence[Callable[[dict], R]], ledger: DropLedger, seed: int
) -> list[R]:
    out: list[R] = []
    for source, adapt in zip(sources, adapters, strict=True):
        records = _adapt_rows(source, adapt, ledger)
        if source.fraction < 1.0:
            records = _first_by_hash(records, round(source.fraction * len(records)), seed, "fraction")
        out.extend(records)
    return out


def _adapt_rows(source: SourceConfig, adapt: Callable[[dict], R], ledger: DropLedger) -> list[R]:
    """Every row of a source through its adapter; each drop is counted (or, if strict, raised)."""
    label = source_label(source)
    records = []
    for row in read_rows(source):
        try:
            records.append(adapt(row))
        except Drop as drop:
            ledger.drop(label, row["_id"], drop)
    ledger.keep(label, len(records))
    return records


def _first_by_hash(records: list[R], n: int, seed: int, purpose: str) -> list[R]:
    """The n records first in a fixed seeded order (so smaller n nest), returned in their old order."""
    ranked = sorted(range(len(records)), key=lambda i: _unit(seed, purpose, records[i].source_id))
    return [records[i] for i in sorted(ranked[:n])]


def _unit(seed: int, purpose: str, row_id: str) -> float:
    """A number in [0, 1) fixed by the seed, the purpose and the row id alone."""
    digest = hashlib.sha256(f"{seed}\0{purpose}\0{row_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64
