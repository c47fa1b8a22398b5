"""The comparison's report: report.md with its tables and pictures, and the same tables in the terminal."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

from rich.table import Table

from pipeline.config import CompareConfig, digest
from pipeline.console import cell, console

COLOURS = {
    "sft": "black",
    "best_of_n": "grey",
    "dpo": "tab:blue",
    "ppo": "tab:orange",
    "ppo_gt": "tab:green",
    "rloo": "tab:red",
    "grpo": "tab:purple",
    "rs": "tab:brown",
    "online_dpo": "tab:cyan",
    "ppo_shared": "tab:olive",
}
SHADES = {  # colour maps per method
    "best_of_n": "Greys",
    "dpo": "Blues",
    "ppo": "Oranges",
    "ppo_gt": "Greens",
    "rloo": "Reds",
    "grpo": "Purples",
    "rs": "YlOrBr",
    "online_dpo": "GnBu",
    "ppo_shared": "YlGn",
}


def _ci(interval: dict | None, percent: bool = False) -> str:
    """'mean [low, high]', as a percentage for win rates."""
    if not interval:
        return ""
    if percent:
        return f"{100 * interval['mean']:.1f}% [{100 * interval['low']:.1f}, {100 * interval['high']:.1f}]"
    return f"{interval['mean']:+.3f} [{interval['low']:+.3f}, {interval['high']:+.3f}]"


def _value(interval: dict | None, digits: int = 3, signed: bool = True) -> str:
    """'mean [low, high]' of a non-rate quantity; '-' where there is none."""
    if not interval:
        return "-"
    form = f"{'+' if signed else ''}.{digits}f"
    return f"{interval['mean']:{form}} [{interval['low']:{form}}, {interval['high']:{form}}]"


def main_rows(results: dict, temperature: float) -> list[list[str]]:
    rows = []
    for m in results["methods"]:
        if m["temperature"] != temperature:
            continue
        kl = m["kl"]
        exact = m["method"] in ("sft", "best_of_n")  # SFT's is 0 and Best-of-N's an analytic bound: no interval
        rows.append(
            [
                m["name"],
                _value(m["gold"]),
                "-" if kl is None else f"{kl['mean']:.2f}" if exact else _value(kl, 2, signed=False),
                _ci(m.get("win_vs_sft"), percent=True),
                _ci(m.get("proxy_win_vs_sft"), percent=True),
                _ci(m.get("win_vs_dataset"), percent=True),
                f"{m['length']:.1f}",
                f"{100 * m['finished']:.0f}%" if "finished" in m else "",
                f"{m['distinct_2']:.3f}",
            ]
        )
    return rows


MAIN_HEADER = [
    "method",
    "gold reward (95% CI)",
    "KL to SFT (95% CI)",
    "gold win rate vs SFT (95% CI)",
    "reward-model win rate vs SFT",
    "win rate vs dataset completion",
    "length",
    "finished",
    "distinct-2",
]

HEAD_TO_HEAD_HEADER = ["DPO", "its KL", "PPO of the nearest KL", "its KL", "temperature", "DPO win rate (95% CI)"]


def head_to_head_rows(results: dict) -> list[list[str]]:
    return [
        [
            h["dpo"],
            _value(h["dpo_kl"], 2, signed=False),
            h["ppo"],
            _value(h["ppo_kl"], 2, signed=False) + ("" if h["kl_intervals_overlap"] else " (apart)"),
            f"{h['temperature']:g}",
            _ci(h["dpo_win_rate"], percent=True),
        ]
        for h in results["head_to_head"]
    ]


def verdict_lines(results: dict) -> list[str]:
    """One line per pair of methods: over which KL ranges whose frontier is above, as the data supports."""
    from pipeline.uncertainty import verdict_sentence

    lines = []
    for v in results.get("frontier_verdicts", []):
        a, b = _label(v["a"]), _label(v["b"])
        if not v["ranges"]:
            lines.append(f"- {a} against {b}: the two frontiers share no KL range")
            continue
        parts = [f"KL {r['from']:.1f}–{r['to']:.1f}: {verdict_sentence(a, b, r['verdict'])}" for r in v["ranges"]]
        lines.append(f"- {a} against {b}: " + "; ".join(parts))
    return lines


def _label(method: str) -> str:
    return method.replace("_", "-").upper()


def print_tables(results: dict) -> None:
    for temperature in sorted({m["temperature"] for m in results["methods"]}):
        table = Table(title=f"temperature {temperature:g}")
        for column in MAIN_HEADER:
            table.add_column(column)
        for row in main_rows(results, temperature):
            table.add_row(*map(cell, row))
        console.print(table)
    if results["head_to_head"]:
        table = Table(title="DPO against the PPO run of the nearest KL (gold reward, per prompt)")
        for column in HEAD_TO_HEAD_HEADER:
            table.add_column(column)
        for row in head_to_head_rows(results):
            table.add_row(*map(cell, row))
        console.print(table)
    for line in verdict_lines(results):
        console.print(cell(line))


def _markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "| " + " | ".join("---" for _ in header) + " |",
        *["| " + " | ".join(row) + " |" for row in rows],
    ]


def write_report(out_dir: Path, results: dict, cfg: CompareConfig) -> None:
    frontier_png = plot_frontier(out_dir / "frontier.png", results["frontier"], cfg.frontier_temperature)
    temperature_png = plot_win_rate_vs_temperature(out_dir / "win_rate_vs_temperature.png", results["methods"])
    lines = [
        "# RLHF vs DPO on the same footing",
        "",
        f"{results['prompts']['count']} held-out prompts (seed {results['prompts']['seed']}), "
        f"{_samples(results['prompts'].get('samples_per_prompt', 1))} per method, temperature and training seed "
        f"(seeds {', '.join(map(str, results.get('seeds', [0])))}), scored by the `{results['gold']}` gold reward. "
        "Each number is a mean over seeds and prompts; its 95% interval is a two-way percentile bootstrap that draws "
        f"seeds and prompts with replacement ({cfg.bootstrap_resamples} resamples; the same prompt draw for every "
        "method, so comparisons stay paired by prompt). Win rates count ties as half. The dataset's own "
        f'completions score {results["prompts"]["dataset_gold_mean"]:+.3f} on average. "finished" is the share of '
        f"completions that ended with EOS within {cfg.max_new_tokens} tokens; the rest are scored as cut text, "
        "without EOS, as PPO and the reward model see them. KL to SFT at temperature T is KL(π_T ‖ SFT_T): along "
        "each sample, the sum over its tokens of the KL between the two models' full next-token distributions at T "
        "(lower variance than the sampled log-ratio, never negative); greedy decoding has none ('-'); Best-of-N's is "
        "the analytic log N − (N−1)/N, an upper bound (exact only without ties).",
        "",
    ]
    for temperature in cfg.temperatures:
        lines += [
            f"## Temperature {temperature:g}{' (greedy)' if temperature == 0 else ''}",
            "",
            *_markdown_table(MAIN_HEADER, main_rows(results, temperature)),
            "",
        ]
    if results["head_to_head"]:
        lines += [
            "## DPO against PPO",
            "",
            "Each DPO run against the PPO run whose KL at the frontier's temperature is nearest its own ('apart': "
            "their KL intervals do not overlap, so the pair is not at matched KL). The frontier verdict below is the "
            "comparison at matched KL.",
            "",
            *_markdown_table(HEAD_TO_HEAD_HEADER, head_to_head_rows(results)),
            "",
        ]
    lines += [
        "## Reward against KL",
        "",
        f"![frontier]({frontier_png.name})",
        "",
        "Error bars are 95% intervals on both axes; faint points are single seeds.",
        "",
        *_markdown_table(
            ["run", "method", "step", "KL to SFT (95% CI)", "gold reward (95% CI)"],
            [
                [p["name"], p["method"], str(p["step"]), _value(p["kl"], 2, signed=False), _value(p["gold"])]
                for p in results["frontier"]
            ],
        ),
        "",
        "### Frontier verdicts",
        "",
        "Each method's frontier is the upper envelope of gold reward over KL across its runs and checkpoints "
        "(linear between its Pareto points). Over the KL range both frontiers reach, the gold-reward difference at "
        "matched KL on a grid, with its 95% interval from the resampled frontiers: a range where the interval "
        "excludes 0 is a difference the data supports.",
        "",
        *verdict_lines(results),
        "",
        "## Win rate against temperature",
        "",
        f"![win rate]({temperature_png.name})",
        "",
    ]
    lines += implicit_reward_lines(results.get("implicit_reward"))
    if results["cost"]:
        on_gpu = any(c.get("peak_gpu_mb") is not None for c in results["cost"])
        lines += [
            "## Cost",
            "",
            "RLHF's PPO also pays for the preference pairs and the reward model; DPO for the pairs. CPU time is "
            "process time over every process and model FLOPs are 6N per trained token and 2N per token of a forward "
            "pass without gradients (N parameters): both measure the work, where wall time on a shared machine also "
            "measures the neighbours.",
            "",
            *_markdown_table(
                ["run", "wall time (s)", "with its inputs (s)", "CPU time (s)", "model FLOPs", "peak memory (MB)"]
                + (["peak GPU memory (MB)"] if on_gpu else [])
                + ["tokens", "forward passes"],
                [
                    [
                        c["name"],
                        f"{c['wall_s']:.0f}",
                        f"{c.get('wall_s_with_inputs', c['wall_s']):.0f}",
                        "-" if c.get("cpu_s") is None else f"{c['cpu_s']:.0f}",
                        "-" if c.get("flops") is None else f"{c['flops']:.2e}",
                        f"{c['peak_rss_mb']:.0f}",
                        *([_megabytes(c.get("peak_gpu_mb"))] if on_gpu else []),
                        f"{c['tokens']:,.0f}",
                        f"{c['forward_passes']:,.0f}",
                    ]
                    for c in results["cost"]
                ],
            ),
            "",
        ]
    if results.get("diagnoses"):
        lines += [
            "## Diagnoses",
            "",
            "What `rlhfdpo doctor` reads off each run's metrics (none: no known failure mode):",
            "",
        ]
        for run, found in results["diagnoses"].items():
            lines += [f"- `{run}`: none"] if not found else [f"- `{run}`:", *[f"  - {d}" for d in found]]
        lines.append("")
    lines += [
        "## How this was made",
        "",
        f"- command: `{' '.join(['rlhfdpo', *sys.argv[1:]])}`",
        f"- compare config digest: `{digest(cfg)}`",
    ]
    for run in [cfg.sft, cfg.reward, *[p.run for p in cfg.policies]]:
        config = Path(run) / "config.yaml" if run else None
        if config and config.is_file():
            lines.append(f"- `{run}`: config digest `{hashlib.sha256(config.read_bytes()).hexdigest()[:12]}`")
    (out_dir / "report.md").write_text("\n".join(lines) + "\n")


def implicit_reward_lines(implicit: dict | None) -> list[str]:
    """DPO's implicit reward beside the reward model, as a reward model is judged (Llama 2's Table 8 layout)."""
    if not implicit:
        return []
    models = implicit["models"]
    levels = list(dict.fromkeys(level for m in models for level in m["by_rating"]))
    gaps = list(dict.fromkeys(gap for m in models for gap in m["by_gap"]))
    header = [
        "reward",
        "accuracy (95% CI)",
        *levels,
        *[f"gold gap {g}" for g in gaps],
        "rank correlation with gold gap",
    ]
    rows = [
        [
            m["name"],
            _ci(m["accuracy"], percent=True),
            *[f"{100 * m['by_rating'][level]['accuracy']:.1f}%" if level in m["by_rating"] else "" for level in levels],
            *[f"{100 * m['by_gap'][gap]['accuracy']:.1f}%" if gap in m["by_gap"] else "" for gap in gaps],
            "-" if m["spearman_gold_gap"] is None else f"{m['spearman_gold_gap']:+.3f}",
        ]
        for m in models
    ]
    counts = models[0]
    pairs_per_level = ", ".join(f"{level} {counts['by_rating'][level]['pairs']}" for level in counts["by_rating"])
    return [
        "## DPO's implicit reward as a reward model",
        "",
        f"On the {implicit['pairs']} held-out pairs of `{implicit['source']}` ({pairs_per_level}): how often each reward "
        "ranks the chosen response above the rejected one, per rating level and per bin of the pair's gold-reward "
        "gap, and Spearman's rank correlation of its reward difference with the gold gap. DPO's implicit reward is "
        "β·log(π/π_SFT) (DPO paper, Eq. 5; the prompt's log-partition term cancels within a pair); for several seeds, "
        "the mean over them.",
        "",
        *_markdown_table(header, rows),
        "",
    ]


def new_figure(width: float = 6.0):
    """A headless matplotlib figure of the report's size: (pyplot, figure, axes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(width, 4.5))
    return plt, fig, ax


def save_figure(plt, fig, ax, path: Path, legend_outside: bool = False) -> Path:
    ax.grid(alpha=0.3)
    if legend_outside:  # one entry per run: beside the plot, never over the lines
        ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8)
    else:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_frontier(path: Path, points: list[dict], temperature: float) -> Path:
    """Gold reward against KL to SFT, one point per run and checkpoint with 95% intervals on both axes,
    and each seed's point faintly (DPO paper, Fig. 2 left)."""
    plt, fig, ax = new_figure()
    for method in sorted({p["method"] for p in points}):
        mine = [p for p in points if p["method"] == method]
        colour = COLOURS.get(method)
        for p in mine:
            ax.scatter(p["kl"]["per_seed"], p["gold"]["per_seed"], color=colour, alpha=0.2, s=12, linewidths=0)
        ax.errorbar(
            [p["kl"]["mean"] for p in mine],
            [p["gold"]["mean"] for p in mine],
            xerr=_error_bars([p["kl"] for p in mine]),
            yerr=_error_bars([p["gold"] for p in mine]),
            fmt="o",
            label=_label(method),
            color=colour,
            alpha=0.85,
            capsize=2,
            markersize=5,
        )
    ax.set_xlabel("KL(π ‖ π_SFT), summed over the response")
    ax.set_ylabel("mean gold reward")
    ax.set_title(f"Reward against KL (temperature {temperature:g})")
    return save_figure(plt, fig, ax, path)


def _error_bars(intervals: list[dict]) -> list[list[float]]:
    return [[i["mean"] - i["low"] for i in intervals], [i["high"] - i["mean"] for i in intervals]]


def _samples(k: int) -> str:
    return "one completion each" if k == 1 else f"{k} completions each"


def plot_win_rate_vs_temperature(path: Path, methods: list[dict]) -> Path:
    """Gold win rate against SFT per method and temperature (DPO paper, Fig. 2 right).

    Each method has its colour family (DPO blues, PPO oranges, ...); its runs are shades of it.
    """
    import matplotlib

    plt, fig, ax = new_figure(width=7.5)
    names = list(dict.fromkeys(m["name"] for m in methods if "win_vs_sft" in m))
    method_of = {m["name"]: m["method"] for m in methods}
    for name in names:
        mine = sorted((m for m in methods if m["name"] == name), key=lambda m: m["temperature"])
        family = [n for n in names if method_of[n] == method_of[name]]
        shade = 0.45 + 0.45 * family.index(name) / max(1, len(family) - 1)
        colour = matplotlib.colormaps[SHADES.get(method_of[name], "Greys")](shade)
        ax.errorbar(
            [m["temperature"] for m in mine],
            [m["win_vs_sft"]["mean"] for m in mine],
            yerr=[
                [m["win_vs_sft"]["mean"] - m["win_vs_sft"]["low"] for m in mine],
                [m["win_vs_sft"]["high"] - m["win_vs_sft"]["mean"] for m in mine],
            ],
            label=name,
            marker="o",
            capsize=3,
            color=colour,
        )
    ax.axhline(0.5, color="black", linewidth=0.8, linestyle=":")
    ax.set_xlabel("sampling temperature")
    ax.set_ylabel("gold win rate against SFT")
    return save_figure(plt, fig, ax, path, legend_outside=True)


def _megabytes(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"
