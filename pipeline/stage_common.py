"""Steps that several stages take the same way: tokenizer set-up, tokenizing records, evaluation shards."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import torch

from pipeline.config import DataConfig, ModelConfig, SampleConfig
from pipeline.console import console, plain
from pipeline.data.records import DataError, Drop, DropLedger
from pipeline.data.tokenize import encode_prompt
from pipeline.launch import Dist, barrier, gather_objects
from pipeline.models import load_tokenizer, train_tokenizer

Record = TypeVar("Record")
Tokenized = TypeVar("Tokenized")


def chat_renderer(tokenizer) -> Callable | None:
    """Renders message lists with the tokenizer's chat template, for conversational datasets."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        return None

    def render(messages: list[dict], add_generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    return render


def scratch_tokenizer(model: ModelConfig, texts: list[str], run_root: Path, dist: Dist):
    """A byte-level BPE trained once, by rank 0, on the training texts; every rank loads that file."""
    folder = run_root / "tokenizer"
    if dist.is_main:
        train_tokenizer(texts, model.architecture.vocab_size).save_pretrained(folder)
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
            console.print(f"[dim]data[/dim] {plain(line)}")


def require_examples(train_set: Sequence, ledger: DropLedger, stage: str) -> None:
    """Stop, naming the drop counts, when tokenization left nothing to train on (before any cache is written)."""
    if not train_set:
        raise DataError(
            f"{stage}: no training example is left after tokenization; "
            + ("; ".join(ledger.summary_lines()) or "the data is empty")
        )


def padded_shard(n: int, dist: Dist) -> list[int | None]:
    """This rank's strided share of range(n), padded with None to the same length on every rank.

    Under FSDP2 every rank must run the same number of forward passes; a None slot is a dummy
    example whose loss is masked out.
    """
    per_rank = -(-n // dist.world_size)
    mine: list[int | None] = list(range(dist.rank, n, dist.world_size))
    return mine + [None] * (per_rank - len(mine))


def shard_batches(n: int, batch_size: int, dist: Dist) -> list[list[int | None]]:
    """This rank's padded share of range(n) in batches: as many batches on every rank (FSDP2)."""
    slots = padded_shard(n, dist)
    return [slots[i : i + batch_size] for i in range(0, len(slots), batch_size)]


def gather_by_index(dist: Dist, mine: dict[int, Record], n: int) -> list[Record]:
    """Every rank's {index: result} for its shard, merged into one list in index order, on every rank."""
    merged: dict[int, Record] = {}
    for part in gather_objects(dist, mine):
        merged.update(part)
    return [merged[i] for i in range(n)]


@torch.no_grad()
def sample_texts(
    model, tokenizer, prompts: list[str], sample: SampleConfig, data: DataConfig, seed: int, dist: Dist
) -> list[tuple[str, str]]:
    """(prompt, continuation) for a few prompts: the samples printed and written to a run's card.

    Every rank generates the same prompts (FSDP2 needs each rank in every forward pass).
    """
    from pipeline.sampling import sample as sample_with

    if not prompts:
        return []
    was_training = model.training
    model.eval()
    prompt_ids = [encode_prompt(tokenizer, p, data) for p in prompts]
    out = sample_with(model, tokenizer, prompt_ids, sample, torch.Generator().manual_seed(seed), dist.sharded)
    model.train(was_training)
    return [(p, tokenizer.decode(seq, skip_special_tokens=True)) for p, seq in zip(prompts, out.sequences)]


def finish_card(
    run_dir, stage: str, cfg, metrics: dict, final: dict, samples: list[tuple[str, str]], dist: Dist
) -> None:
    """Print the samples and write the run's card with the last training and final metrics."""
    if dist.is_main:
        for prompt, text in samples:
            console.print(f"  [bold]{plain(prompt)}[/bold]{plain(text)}")
    run_dir.write_card(
        stage,
        cfg,
        {**{k: v for k, v in metrics.items() if k != "step"}, **final},
        notes=["## Samples", "", *[f"- **{p}**{t}" for p, t in samples]],
    )
