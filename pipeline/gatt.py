"""`rlhfdpo data gatt`: Ghost Attention training data (Llama 2, Sec. 3.3).

1. Take multi-turn dialogues (their user turns) and a set of instructions.
2. Give each dialogue instructions (combined at random) and write them into every user message.
3. Let the policy (the latest RLHF model) answer turn by turn, its own replies in context.
4. Write one training example per sampled reply: the instructions only in the system message,
   the user messages without them, the earlier replies as context with `"weight": 0`, and the loss
   on that one reply. A reply cut at `sample.max_new_tokens` is not trained (it would teach a stop
   in mid-sentence), nor, with `only_adherent`, one that fails the instructions' checks.

The output is an ordinary `messages` dataset: `rlhfdpo sft` fine-tunes the policy on it (step 5).
Llama 2 also had the model shorten some instructions; a small model cannot paraphrase, so an
instruction's own `short` wording stands in, for `short_fraction` of the examples.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import torch

from pipeline.config import GattConfig, write_resolved
from pipeline.console import console
from pipeline.cost import CostMeter
from pipeline.data.records import DataError, DropLedger
from pipeline.dialogues import (
    conversation,
    instructions_from,
    read_dialogues,
    require_template,
    roll_out,
    with_system,
)
from pipeline.files import write_jsonl
from pipeline.instructions import Combined, combine, with_instruction
from pipeline.launch import init_distributed, shard
from pipeline.models import load_causal_lm, load_tokenizer
from pipeline.runs import prepare_output_dir
from pipeline.stage_common import report_drops
from pipeline.training import seed_everything

OUTPUTS = ("train.jsonl", "summary.json", "README.md", "config.yaml", "cost.json")


def run(cfg: GattConfig, overwrite: bool = False) -> Path:
    dist = init_distributed()
    seed_everything(cfg.seed)
    out_dir = Path(cfg.output_dir)
    prepare_output_dir(out_dir, dist, resume=False, overwrite=overwrite, produces=OUTPUTS)
    meter = CostMeter(dist)

    # ---- load: dialogues, instructions, the policy
    ledger = DropLedger()
    dialogues = read_dialogues(cfg.dialogues, ledger)[: cfg.num_dialogues]
    report_drops(ledger, dist)
    if not dialogues:
        raise DataError(f"{cfg.dialogues.path}: no dialogue with a user message; " + "; ".join(ledger.summary_lines()))
    instructions = instructions_from(cfg.instructions)
    tokenizer = load_tokenizer(cfg.model)
    render = require_template(tokenizer, cfg.model.name_or_path)
    model = meter.watch(shard(load_causal_lm(cfg.model), dist, cfg.model.dtype), "policy")

    # ---- build: each dialogue's instructions, turns and wording (GAtt steps 1-2)
    plans = [plan_dialogue(users, i, cfg, instructions) for i, (_, _, users) in enumerate(dialogues)]
    prompts = [
        (system, [with_instruction(given.text(), user) for user in users])
        for (_, system, _), (given, users, _) in zip(dialogues, plans)
    ]

    # ---- loop: the policy answers every turn with the instructions in front of it (step 3)
    generator = torch.Generator().manual_seed(cfg.seed)
    rollouts = roll_out(
        model, tokenizer, render, prompts, cfg.sample, cfg.max_length, cfg.batch_size, generator, (dist, "gatt turns")
    )

    # ---- save: one example per kept reply (step 4), the summary and the card
    rows, tally = [], Tally(max(len(users) for _, users in prompts))
    for (source_id, system, _), (given, users, short), rollout in zip(dialogues, plans, rollouts):
        tally.dialogue(given, short, len(users), len(rollout.replies))
        for turn, (reply, done) in enumerate(zip(rollout.replies, rollout.finished)):
            follows = tally.reply(turn, given.check(reply), done)
            if not done or (cfg.only_adherent and follows is False):
                continue
            rows.append(
                {
                    "id": f"{source_id}/turn-{turn + 1}",
                    "messages": training_messages(given.text(short), system, users[: turn + 1], rollout.replies),
                    "instruction": given.text(),
                    "turn": turn + 1,
                }
            )
    if not rows:
        raise DataError("gatt: no sampled reply could be kept; " + tally.reasons_line(cfg.only_adherent))
    summary = tally.summary(len(rows), cfg)
    write_jsonl(out_dir / "train.jsonl", rows)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    (out_dir / "README.md").write_text(card(cfg, summary))
    write_resolved(cfg, out_dir)
    meter.write(out_dir)
    console.print(
        f"gatt: {len(rows)} examples from {summary['dialogues']} dialogues ({summary['turns_sampled']} replies "
        f"sampled); adherence of the sampled replies by turn: "
        + ", ".join(_rate(r) for r in summary["adherence_by_turn"])
        + f"; {tally.reasons_line(cfg.only_adherent)}"
    )
    return out_dir


def plan_dialogue(
    users: list[str], index: int, cfg: GattConfig, instructions: list
) -> tuple[Combined, list[str], bool]:
    """(instructions given, the user turns used, whether the system message uses the short wording)."""
    rng = random.Random(f"{cfg.seed}:gatt:{index}")
    given = combine(instructions, rng, *cfg.combine)
    turns = min(rng.randint(*cfg.turns), len(users))
    return given, users[:turns], rng.random() < cfg.short_fraction


def training_messages(instruction: str, system: str | None, users: list[str], replies: list[str]) -> list[dict]:
    """The dialogue through the last user turn's reply, the instructions in the system message only,
    the loss on the last reply alone (earlier ones are context: weight 0)."""
    messages = conversation(with_system(instruction, system), users, replies[: len(users)])
    last = len(messages) - 1
    return [{**m, "weight": int(i == last)} if m["role"] == "assistant" else m for i, m in enumerate(messages)]


class Tally:
    """Counts for the summary: dialogues, turns, instructions, and adherence of the sampled replies."""

    def __init__(self, longest: int):
        self.dialogues = 0
        self.planned_turns = 0
        self.context_full = 0
        self.short = 0
        self.combinations: Counter[str] = Counter()
        self.kinds: Counter[str] = Counter()
        self.sizes: Counter[int] = Counter()
        self.unfinished = 0
        self.failed = 0
        self.by_turn = [[0, 0] for _ in range(longest)]  # [passed, checked]
        self.by_kind: dict[str, list[int]] = {}

    def dialogue(self, given: Combined, short: bool, planned: int, reached: int) -> None:
        self.dialogues += 1
        self.planned_turns += planned
        self.context_full += planned - reached
        self.short += short
        self.combinations[given.text()] += 1
        self.sizes[len(given.parts)] += 1
        for part in given.parts:
            self.kinds.update(k if not k.startswith("text:") else "unchecked" for k in part.kinds)

    def reply(self, turn: int, results: dict[str, bool], finished: bool) -> bool | None:
        """Count one sampled reply by its check results; returns whether it follows the instructions
        (None when nothing could be checked)."""
        self.unfinished += not finished
        for kind, passed in results.items():
            self.by_kind.setdefault(kind, [0, 0])
            self.by_kind[kind][0] += passed
            self.by_kind[kind][1] += 1
        if not results:
            return None
        passed = all(results.values())
        self.by_turn[turn][0] += passed
        self.by_turn[turn][1] += 1
        self.failed += finished and not passed
        return passed

    def reasons_line(self, only_adherent: bool) -> str:
        failing = f"{self.failed} failing the instructions, " if only_adherent else ""
        return (
            f"not trained: {self.unfinished} replies cut at sample.max_new_tokens, {failing}"
            f"{self.context_full} turns not sampled (context full)"
        )

    def summary(self, examples: int, cfg: GattConfig) -> dict:
        return {
            "dialogues": self.dialogues,
            "turns_planned": self.planned_turns,
            "turns_sampled": self.planned_turns - self.context_full,
            "examples": examples,
            "not_trained": {
                "unfinished": self.unfinished,
                "failing_instructions": self.failed if cfg.only_adherent else 0,
                "context_full": self.context_full,
            },
            "instructions": {
                "distinct_combinations": len(self.combinations),
                "per_dialogue": {str(k): v for k, v in sorted(self.sizes.items())},
                "checks": dict(self.kinds),
                "short_wording_dialogues": self.short,
            },
            "adherence_by_turn": [
                {"turn": t + 1, "passed": p, "checked": n, "rate": p / n if n else None}
                for t, (p, n) in enumerate(self.by_turn)
            ],
            "adherence_by_check": {k: {"passed": p, "checked": n, "rate": p / n} for k, (p, n) in self.by_kind.items()},
        }


def _rate(row: dict) -> str:
    return f"turn {row['turn']} {100 * row['rate']:.0f}%" if row["rate"] is not None else f"turn {row['turn']} -"


def card(cfg: GattConfig, summary: dict) -> str:
    lines = [
        "# Ghost Attention data",
        "",
        f"Replies sampled from `{cfg.model.name_or_path}` with the instructions written into every user message "
        f"(temperature {cfg.sample.temperature}, at most {cfg.sample.max_new_tokens} new tokens); each example "
        "shows the instructions in the system message only and trains on one reply (earlier replies: weight 0).",
        "",
        f"- dialogues: {summary['dialogues']} from `{cfg.dialogues.path}` (split {cfg.dialogues.split}), "
        f"{cfg.turns[0]}-{cfg.turns[1]} turns each",
        f"- replies sampled: {summary['turns_sampled']}; examples written: {summary['examples']}",
        f"- not trained: {summary['not_trained']}",
        f"- instructions: {summary['instructions']}",
        "",
        "| turn | replies checked | follow the instructions |",
        "| --- | --- | --- |",
    ]
    for row in summary["adherence_by_turn"]:
        rate = "-" if row["rate"] is None else f"{100 * row['rate']:.1f}%"
        lines.append(f"| {row['turn']} | {row['checked']} | {rate} |")
    lines += [
        "",
        "Train on it: `rlhfdpo sft` with `data.train: [{path: <this folder>/train.jsonl, format: messages}]`.",
    ]
    return "\n".join(lines) + "\n"
