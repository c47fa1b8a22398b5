"""`rlhfdpo adherence`: does a model keep an instruction given in the first turn, turn after turn?

Every model answers the same held-out dialogues, with the same instructions in the system message
only, for `turns` turns, its own replies in context. At each turn index the share of replies that
pass every check of the instructions is the adherence rate, with a 95% percentile bootstrap
interval over dialogues; the last model's difference from the first is paired by dialogue. The
chance baseline is the first model answering with no instruction at all, checked against the same
instructions: the rate a model reaches without listening.

The attention picture follows Llama 2's Figure 10: for each turn's reply, the share of attention
its positions give the system message's tokens, per layer (averaged over heads and positions).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from pipeline.config import AdherenceConfig, ModelConfig, write_resolved
from pipeline.console import console
from pipeline.cost import CostMeter
from pipeline.data.records import DataError, Drop, DropLedger
from pipeline.dialogues import (
    Rollout,
    attention_on,
    conversation,
    generated,
    instructions_from,
    message_spans,
    read_dialogues,
    require_template,
    roll_out,
    with_system,
)
from pipeline.evaluation import bootstrap_mean, paired_bootstrap
from pipeline.files import write_jsonl
from pipeline.instructions import Combined, combine
from pipeline.launch import init_distributed
from pipeline.models import load_causal_lm, load_tokenizer
from pipeline.report import new_figure, save_figure
from pipeline.runs import prepare_output_dir
from pipeline.stage_common import report_drops
from pipeline.training import seed_everything

OUTPUTS = ("report.md", "results.json", "adherence.png", "attention.png", "samples.jsonl", "config.yaml", "cost.json")
CHANCE = "chance"


def run(cfg: AdherenceConfig, overwrite: bool = False) -> Path:
    dist = init_distributed()
    seed_everything(cfg.seed)
    out_dir = Path(cfg.output_dir)
    prepare_output_dir(out_dir, dist, resume=False, overwrite=overwrite, produces=OUTPUTS)
    meter = CostMeter(dist)

    # ---- load: dialogues long enough, and the instructions each one gets
    ledger = DropLedger()
    every = read_dialogues(cfg.dialogues, ledger)
    report_drops(ledger, dist)
    dialogues = [d for d in every if len(d[2]) >= cfg.turns][: cfg.num_dialogues]
    if not dialogues:
        raise DataError(f"{cfg.dialogues.path}: no dialogue has {cfg.turns} user turns")
    if len(dialogues) < cfg.num_dialogues:
        console.print(f"adherence: only {len(dialogues)} dialogues have {cfg.turns} user turns; using those")
    instructions = instructions_from(cfg.instructions)
    given = [
        combine(instructions, random.Random(f"{cfg.seed}:adherence:{i}"), *cfg.combine) for i in range(len(dialogues))
    ]

    # ---- loop: every model answers every dialogue; the first also without the instructions.
    # Attention is read on the first model's conversations, teacher-forced through every model, so
    # that a model writing shorter replies is not credited with more attention for it.
    passes: dict[str, list[list[float | None]]] = {}
    reached: dict[str, list[int]] = {}
    by_check: dict[str, dict[str, list[list[float]]]] = {}
    attention: dict[str, list[list[float]]] = {}
    samples: list[dict] = []
    shown: list[list[dict]] = []  # the first model's whole conversations, for the attention picture
    for index, spec in enumerate(cfg.models):
        model_cfg = ModelConfig(name_or_path=spec.path)
        tokenizer = load_tokenizer(model_cfg)
        render = require_template(tokenizer, spec.path)
        model = meter.watch(load_causal_lm(model_cfg).to(dist.device), spec.name)
        conditions = [(spec.name, True)] + ([(CHANCE, False)] if index == 0 and cfg.chance_baseline else [])
        for name, instructed in conditions:
            prompts = [
                (with_system(g.text(), system) if instructed else system, users[: cfg.turns])
                for (_, system, users), g in zip(dialogues, given)
            ]
            generator = torch.Generator().manual_seed(cfg.seed)  # the same draws for every model
            rollouts = roll_out(
                model,
                tokenizer,
                render,
                prompts,
                cfg.sample,
                cfg.max_length,
                cfg.batch_size,
                generator,
                (dist, f"{name} turns"),
            )
            passes[name], by_check[name] = score(rollouts, given, cfg.turns)
            reached[name] = [sum(len(r.replies) > turn for r in rollouts) for turn in range(cfg.turns)]
            samples += [
                {"model": name, "dialogue": d[0], "instruction": g.text(), "replies": r.replies}
                for d, g, r in zip(dialogues[:20], given, rollouts)
            ]
            if instructed and index == 0:
                shown = [
                    conversation(system, users, r.replies)
                    for (system, users), r in zip(prompts, rollouts)
                    if len(r.replies) == cfg.turns
                ][: cfg.attention_dialogues]
        if shown:
            attention[spec.name] = system_attention(model, tokenizer, render, shown)
        del model

    # ---- save: intervals, the report, the pictures
    attention = {name: grid for name, grid in attention.items() if grid}
    results = summarize(passes, by_check, attention, cfg, [m.name for m in cfg.models], len(dialogues))
    results["reached"] = reached
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(results, indent=2))
    write_jsonl(out_dir / "samples.jsonl", samples)
    plot_adherence(out_dir / "adherence.png", results)
    if attention:
        plot_attention(out_dir / "attention.png", results)
    (out_dir / "report.md").write_text(report(results, cfg))
    write_resolved(cfg, out_dir)
    meter.write(out_dir)
    for line in table_lines(results):
        console.print(line)
    return out_dir


def score(
    rollouts: list[Rollout], given: list[Combined], turns: int
) -> tuple[list[list[float | None]], dict[str, list[list[float]]]]:
    """Per turn, each dialogue's 1.0 (every check passed), 0.0, or None (turn not reached, nothing to check);
    and per check, per turn, the outcomes of that check alone."""
    per_turn: list[list[float | None]] = [[] for _ in range(turns)]
    per_check: dict[str, list[list[float]]] = {}
    for rollout, instruction in zip(rollouts, given):
        for turn in range(turns):
            if turn >= len(rollout.replies):
                per_turn[turn].append(None)
                continue
            results = instruction.check(rollout.replies[turn])
            per_turn[turn].append(float(all(results.values())) if results else None)
            for check, passed in results.items():
                per_check.setdefault(check, [[] for _ in range(turns)])[turn].append(float(passed))
    return per_turn, per_check


@torch.no_grad()
def system_attention(model, tokenizer, render, conversations: list[list[dict]]) -> list[list[float]]:
    """Mean attention share on the system message's content, per layer and turn: (L, turns) as lists.

    For each conversation (a system message, then user and assistant turns), the positions that
    generate each reply (its content and end of turn) and their attention on the system message's
    content tokens, averaged over conversations. [] when no conversation could be cut (template mismatch).
    """
    kernel = model.config._attn_implementation
    model.set_attn_implementation("eager")  # sdpa does not return attention weights
    total, counted = None, 0
    for messages in conversations:
        try:
            ids, spans = message_spans(tokenizer, render, messages)
        except Drop:
            continue
        system = (spans[0].content_start, spans[0].content_end)
        replies = [
            generated(span, ids, tokenizer.eos_token_id) for span, m in zip(spans, messages) if m["role"] == "assistant"
        ]
        mass = attention_on(model, ids, system, replies)  # (L, turns)
        total = mass if total is None else total + mass
        counted += 1
    model.set_attn_implementation(kernel)
    return [] if total is None else (total / counted).tolist()


def _interval(values: list[float], cfg: AdherenceConfig) -> dict | None:
    if not values:
        return None
    mean, low, high = bootstrap_mean(values, cfg.bootstrap_resamples, cfg.seed)
    return {"mean": mean, "low": low, "high": high, "n": len(values)}


def summarize(passes, by_check, attention, cfg: AdherenceConfig, names: list[str], n_dialogues: int) -> dict:
    first, last = names[0], names[-1]
    rows = []
    for turn in range(cfg.turns):
        row: dict = {"turn": turn + 1}
        for name, outcomes in passes.items():
            row[name] = _interval([v for v in outcomes[turn] if v is not None], cfg)
        if last != first:
            paired = [
                (b, a) for b, a in zip(passes[last][turn], passes[first][turn]) if a is not None and b is not None
            ]
            if paired:
                mean, low, high = paired_bootstrap(
                    [b for b, _ in paired], [a for _, a in paired], cfg.bootstrap_resamples, cfg.seed
                )
                row["difference"] = {"mean": mean, "low": low, "high": high, "n": len(paired)}
        rows.append(row)
    checks = {
        name: {check: [_interval(values, cfg) for values in per_turn] for check, per_turn in sorted(checks_of.items())}
        for name, checks_of in by_check.items()
    }
    return {
        "models": names,
        "chance": CHANCE in passes,
        "dialogues": n_dialogues,
        "turns": cfg.turns,
        "by_turn": rows,
        "by_check": checks,
        "attention": attention,  # model -> (layers, turns)
        "attention_dialogues": cfg.attention_dialogues,
    }


def _cell(interval: dict | None) -> str:
    if interval is None:
        return "-"
    return f"{100 * interval['mean']:.1f}% [{100 * interval['low']:.1f}, {100 * interval['high']:.1f}]"


def _signed(interval: dict | None) -> str:
    if interval is None:
        return "-"
    return f"{100 * interval['mean']:+.1f} [{100 * interval['low']:+.1f}, {100 * interval['high']:+.1f}]"


def table_lines(results: dict) -> list[str]:
    names = results["models"]
    columns = names + ([CHANCE] if results["chance"] else [])
    diff = len(names) > 1
    header = ["turn", *columns] + ([f"{names[-1]} - {names[0]} (points)"] if diff else [])
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for row in results["by_turn"]:
        cells = [str(row["turn"]), *[_cell(row.get(c)) for c in columns]]
        cells += [_signed(row.get("difference"))] if diff else []
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def attention_lines(results: dict) -> list[str]:
    names = [n for n in results["models"] if results["attention"].get(n)]
    if not names:
        return []
    lines = ["| turn | " + " | ".join(names) + " |", "|" + " --- |" * (len(names) + 1)]
    for turn in range(results["turns"]):
        cells = []
        for name in names:
            layers = results["attention"][name]
            cells.append(f"{100 * sum(layer[turn] for layer in layers) / len(layers):.1f}%")
        lines.append(f"| {turn + 1} | " + " | ".join(cells) + " |")
    return lines


def report(results: dict, cfg: AdherenceConfig) -> str:
    models = ", ".join(f"`{m.name}` = `{m.path}`" for m in cfg.models)
    lines = [
        "# Instruction adherence by turn",
        "",
        f"Models: {models}. {results['dialogues']} held-out dialogues from `{cfg.dialogues.path}` "
        f"(split {cfg.dialogues.split}), {cfg.turns} turns each, the instructions (combined {cfg.combine[0]}-"
        f"{cfg.combine[1]} at a time) in the system message only; sampled at temperature {cfg.sample.temperature}, "
        f"at most {cfg.sample.max_new_tokens} tokens a reply. A reply adheres when it passes every check of its "
        f"instructions. 95% percentile bootstrap intervals over dialogues ({cfg.bootstrap_resamples} resamples); "
        "the difference is paired by dialogue."
        + (
            f" `{CHANCE}`: the first model with no instruction, checked against the same ones."
            if results["chance"]
            else ""
        ),
        "",
        *table_lines(results),
        "",
        *_stopped_lines(results),
        "![adherence by turn](adherence.png)",
        "",
    ]
    for name, checks in results["by_check"].items():
        lines += [
            f"Adherence per check, `{name}`:",
            "",
            "| check | " + " | ".join(f"turn {t + 1}" for t in range(cfg.turns)) + " |",
        ]
        lines.append("|" + " --- |" * (cfg.turns + 1))
        for check, intervals in checks.items():
            lines.append(f"| {check} | " + " | ".join(_cell(i) for i in intervals) + " |")
        lines.append("")
    attention = attention_lines(results)
    if attention:
        lines += [
            "## Attention on the system message",
            "",
            "Share of attention the positions generating each turn's reply give the system message's content, "
            f"mean over layers, heads and positions, on the same conversations for every model: the first "
            f"{cfg.attention_dialogues} that `{cfg.models[0].name}` carried through every turn, teacher-forced "
            "through each model (Llama 2, Fig. 10):",
            "",
            *attention,
            "",
            "![attention on the system message, per layer and turn](attention.png)",
            "",
        ]
    return "\n".join(lines)


def _stopped_lines(results: dict) -> list[str]:
    """Which models' dialogues stopped early (context full), so that a late turn's rate is read with its n."""
    lines = []
    for name, counts in results.get("reached", {}).items():
        if counts and counts[-1] < results["dialogues"]:
            lines.append(
                f"- `{name}`: dialogues reaching each turn: {', '.join(map(str, counts))} of {results['dialogues']} "
                "(the rest stopped: their context would pass max_length); each rate is over those reaching it."
            )
    return [*lines, ""] if lines else []


def plot_adherence(path: Path, results: dict) -> Path:
    plt, fig, ax = new_figure()
    turns = [row["turn"] for row in results["by_turn"]]
    for name in results["models"] + ([CHANCE] if results["chance"] else []):
        cells = [row.get(name) for row in results["by_turn"]]
        shown = [(t, c) for t, c in zip(turns, cells) if c is not None]
        style = {"linestyle": ":", "color": "grey"} if name == CHANCE else {"marker": "o"}
        line = ax.plot([t for t, _ in shown], [c["mean"] for _, c in shown], label=name, **style)[0]
        ax.fill_between(
            [t for t, _ in shown],
            [c["low"] for _, c in shown],
            [c["high"] for _, c in shown],
            alpha=0.2,
            color=line.get_color(),
        )
    ax.set_xlabel("turn")
    ax.set_ylabel("replies following the first-turn instruction")
    ax.set_ylim(0, 1)
    ax.set_xticks(turns)
    ax.set_title("Adherence by turn (95% bootstrap intervals)")
    return save_figure(plt, fig, ax, path)


def plot_attention(path: Path, results: dict) -> Path:
    """One heat map per model: attention share on the system message, layers by turns, on one colour scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in results["models"] if results["attention"].get(n)]
    top = max(max(max(layer) for layer in results["attention"][n]) for n in names)
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names) + 1.2, 3.4), squeeze=False)
    for ax, name in zip(axes[0], names):
        grid = results["attention"][name]
        image = ax.imshow(grid, vmin=0, vmax=top, cmap="viridis", aspect="auto", origin="lower")
        ax.set_title(name)
        ax.set_xlabel("turn")
        ax.set_xticks(range(len(grid[0])), [str(t + 1) for t in range(len(grid[0]))])
        ax.set_yticks(range(len(grid)), [str(layer + 1) for layer in range(len(grid))])
        ax.set_ylabel("layer")
    fig.colorbar(image, ax=axes[0].tolist(), label="attention on the system message")
    fig.suptitle("Where the replies look: the system message's share of attention", y=1.04)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path
