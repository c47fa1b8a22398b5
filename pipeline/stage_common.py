"""Steps that several stages take the same way: tokenizer set-up, tokenizing records, evaluation shards."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from pipeline.config import DataConfig, ModelConfig
from pipeline.data.records import Drop, DropLedger
from pipeline.launch import Dist, barrier
from pipeline.models import is_scratch, load_tokenizer, train_tokenizer
from pipeline.training import console

Record = TypeVar("Record")
Tokenized = TypeVar("Tokenized")


def chat_renderer(tokenizer) -> Callable | None:
    """Renders message lists with the tokenizer's chat template, for conversational datasets."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        return None

    def render(messages: list[dict], add_generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    return render


def prepare_tokenizer(model: ModelConfig, texts: Callable[[], list[str]], run_root: Path, dist: Dist, source: str | None = None):
    """The model's own tokenizer, or for a scratch model one trained once by rank 0 on `texts()`.

    `source` is a folder to load from instead (a checkpoint being resumed).
    """
    if source is not None:
        return load_tokenizer(model, source)
    if not is_scratch(model):
        return load_tokenizer(model)
    folder = run_root / "tokenizer"
    if dist.is_main:
        tokenizer = train_tokenizer(texts(), model.architecture.vocab_size)
        tokenizer.save_pretrained(folder)
    barrier(dist)
    return load_tokenizer(model, str(folder))


def tokenize_records(
    records: Sequence[Record],
    tokenize: Callable[[Record], Tokenized],
    ledger: DropLedger,
    label: str,
) -> list[Tokenized]:
    """Tokenize every record; those the tokenizer cannot fit are counted in the ledger, not lost."""
    out = []
    for record in records:
        try:
            out.append(tokenize(record))
        except Drop as drop:
            ledger.drop(label, getattr(record, "source_id", "?"), drop)
    return out


def report_drops(ledger: DropLedger, dist: Dist) -> None:
    if dist.is_main:
        for line in ledger.summary_lines():
            console.print(f"[dim]data[/dim] {line}")


def padded_shard(n: int, dist: Dist) -> list[int | None]:
    """This rank's strided share of range(n), padded with None to the same length on every rank.

    Under FSDP2 every rank must run the same number of forward passes; a None slot is a dummy
    example whose loss is masked out.
    """
    per_rank = -(-n // dist.world_size)
    mine: list[int | None] = list(range(dist.rank, n, dist.world_size))
    return mine + [None] * (per_rank - len(mine))


def check_data_config_fits(data: DataConfig, n_positions: int | None) -> None:
    if n_positions is not None and data.max_length > n_positions:
        raise ValueError(f"data.max_length={data.max_length} exceeds the model's {n_positions} positions")
