"""`rlhfdpo data inspect`: what a stage would train on, before it trains.

Counts per source, drops by reason, token-length percentiles, and a few examples rendered token by
token with the masked (no-loss) part marked, so a wrong prompt/response split is seen at a glance.
"""

from __future__ import annotations

from rich.markup import escape
from rich.table import Table

from pipeline.config import SFTConfig
from pipeline.console import console
from pipeline.data.adapters import PAIR_FORMATS
from pipeline.data.loading import load_pairs, load_sft_examples
from pipeline.data.records import DropLedger
from pipeline.data.tokenize import IGNORE, TokenizedExample, tokenize_example, tokenize_sft
from pipeline.models import is_scratch, load_tokenizer, render_chat, train_tokenizer
from pipeline.stage_common import chat_renderer, tokenize_records


def percentiles(values: list[int], qs=(0, 50, 90, 99, 100)) -> dict[int, int]:
    ordered = sorted(values)
    if not ordered:
        return {q: 0 for q in qs}
    return {q: ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))] for q in qs}


def render_example(tokenizer, example: TokenizedExample) -> str:
    """Rich markup: each masked run dim inside ⟦ ⟧, each trained run plain, special tokens shown.

    A conversation alternates: system and user turns masked, every assistant reply trained.
    """
    trained = [label != IGNORE for label in example.labels]
    runs, start = [], 0
    for i in range(1, len(trained) + 1):
        if i == len(trained) or trained[i] != trained[start]:
            text = escape(tokenizer.decode(example.input_ids[start:i]))
            runs.append(text if trained[start] else f"[dim]⟦{text}⟧[/dim]")
            start = i
    return "".join(runs)


def inspect_data(cfg, n_examples: int = 3) -> None:
    ledger = DropLedger(cfg.data.strict)
    tokenizer = None if is_scratch(cfg.model) else load_tokenizer(cfg.model)
    render = render_chat if tokenizer is None else chat_renderer(tokenizer)  # a scratch tokenizer's template
    # SFT reads a preference file's chosen side (every assistant turn); the pair stages read pairs.
    wants_pairs = not isinstance(cfg, SFTConfig) and any(s.format in PAIR_FORMATS for s in cfg.data.train)
    if wants_pairs:
        train, evaluation = load_pairs(cfg.data, ledger, render)
        texts = [p.prompt + p.chosen for p in train] + [p.rejected for p in train]
        sides = {
            "chosen": lambda p: tokenize_example(tokenizer, p.prompt, p.chosen, cfg.data),
            "rejected": lambda p: tokenize_example(tokenizer, p.prompt, p.rejected, cfg.data),
        }
    else:
        train, evaluation = load_sft_examples(cfg.data, ledger, render)
        texts = [r.prompt + r.response for r in train]
        sides = {"example": lambda r: tokenize_sft(tokenizer, r, cfg.data)}
    if tokenizer is None:  # a scratch model's tokenizer is trained on the data, as the stage would
        tokenizer = train_tokenizer(texts, cfg.model.architecture.vocab_size)

    tokenized = {name: tokenize_records(train, fn, ledger, "tokenize") for name, fn in sides.items()}

    console.print(
        f"[bold]{'preference pairs' if wants_pairs else 'SFT examples'}[/bold]: "
        f"{len(train)} train, {len(evaluation)} eval"
    )
    for line in ledger.summary_lines():
        console.print(f"  {line}")
    drops = ledger.reasons()
    console.print("dropped by reason: " + (", ".join(f"{r}: {n}" for r, n in sorted(drops.items())) or "none"))

    table = Table(title="token lengths (train)")
    table.add_column("part")
    for q in (0, 50, 90, 99, 100):
        table.add_column(f"p{q}", justify="right")
    first = next(iter(tokenized.values()))
    rows = {"prompt": [e.prompt_length for e in first]}
    for name, examples in tokenized.items():
        rows[f"{name} response"] = [len(e.input_ids) - e.prompt_length for e in examples]
        rows[f"{name} total"] = [len(e.input_ids) for e in examples]
    for name, values in rows.items():
        table.add_row(name, *[str(v) for v in percentiles(values).values()])
    console.print(table)

    console.print("[bold]examples[/bold] (⟦masked: no loss⟧ trained):")
    for i in range(min(n_examples, len(first))):
        for name, examples in tokenized.items():
            console.print(f"[bold]#{i} {name}[/bold] {render_example(tokenizer, examples[i])}")
