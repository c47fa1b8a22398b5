"""The comparison's report: report.md with its tables and pictures, and the same tables in the terminal."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

from rich.table import Table

from pipeline.config import CompareConfig, digest
from pipeline.console import cell, console

COLOURS = {"sft": "black", "best_of_n": "grey", "dpo": "tab:blue", "ppo": "tab:orange", "ppo_gt": "tab:green"}
SHADES = {"best_of_n": "Greys", "dpo": "Blues", "ppo": "Oranges", "ppo_gt": "Greens"}  # colour maps per method


def _ci(interval: dict | None, percent: bool = False) -> str:
    """'mean [low, high]', as a percentage for win rates."""
    if not interval:
        return ""
    if percent:
        return f"{100 * interval['mean']:.1f}% [{100 * interval['low']:.1f}, {100 * interval['high']:.1f}]"
    return f"{interval['mean']:+.3f} [{interval['low']:+.3f}, {interval['high']:+.3f}]"


def main_rows(results: dict, temperature: float) -> list[list[str]]:
    rows = []
    for m in results["methods"]:
        if m["temperature"] != temperature:
            continue
        rows.append(
            [
                m["name"],
                f"{m['gold']['mean']:+.3f}",
                f"{m['kl']:.2f}" if m["kl"] is not None else "-",
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
    "gold reward",
    "KL to SFT",
    "gold win rate vs SFT (95% CI)",
    "reward-model win rate vs SFT",
    "win rate vs dataset completion",
    "length",
    "finished",
    "distinct-2",
]


def print_tables(results: dict) -> None:
    for temperature in sorted({m["temperature"] for m in results["methods"]}):
        table = Table(title=f"temperature {temperature:g}")
        for column in MAIN_HEADER:
            table.add_column(column)
        for row in main_rows(results, temperature):
            table.add_row(*map(cell, row))
        console.print(table)
    if results["head_to_head"]:
        table = Table(title="DPO against PPO (gold reward, per prompt)")
        for column in ("DPO", "PPO", "temperature", "DPO win rate (95% CI)"):
            table.add_column(column)
        for h in results["head_to_head"]:
            table.add_row(cell(h["dpo"]), cell(h["ppo"]), f"{h['temperature']:g}", _ci(h["dpo_win_rate"], percent=True))
        console.print(table)


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
        f"{results['prompts']['count']} held-out prompts (seed {results['prompts']['seed']}), one completion each per "
        f"method and temperature, scored by the `{results['gold']}` gold reward. Win rates count ties as half and carry "
        f"95% paired bootstrap intervals over prompts ({cfg.bootstrap_resamples} resamples). The dataset's own "
        f'completions score {results["prompts"]["dataset_gold_mean"]:+.3f} on average. "finished" is the share of '
        f"completions that ended with EOS within {cfg.max_new_tokens} tokens; the rest are scored as cut text, "
        "without EOS, as PPO and the reward model see them. KL to SFT at temperature T is KL(π_T ‖ SFT_T), both "
        "models' log-probabilities taken at T, estimated from the samples; greedy decoding has none ('-'); "
        "Best-of-N's is the analytic log N − (N−1)/N, an upper bound (exact only without ties).",
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
            *_markdown_table(
                ["DPO", "PPO", "temperature", "DPO win rate (95% CI)"],
                [
                    [h["dpo"], h["ppo"], f"{h['temperature']:g}", _ci(h["dpo_win_rate"], percent=True)]
                    for h in results["head_to_head"]
                ],
            ),
            "",
        ]
    lines += [
        "## Reward against KL",
        "",
        f"![frontier]({frontier_png.name})",
        "",
        *_markdown_table(
            ["run", "method", "step", "KL to SFT", "gold reward"],
            [
                [p["name"], p["method"], str(p["step"]), f"{p['kl']:.2f}", f"{p['gold']:+.3f}"]
                for p in results["frontier"]
            ],
        ),
        "",
        "## Win rate against temperature",
        "",
        f"![win rate]({temperature_png.name})",
        "",
    ]
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
                        f"{c['tokens']:,}",
                        f"{c['forward_passes']:,}",
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
    """Gold reward against KL to SFT, one point per run and checkpoint (DPO paper, Fig. 2 left)."""
    plt, fig, ax = new_figure()
    for method in sorted({p["method"] for p in points}):
        mine = [p for p in points if p["method"] == method]
        ax.scatter(
            [p["kl"] for p in mine],
            [p["gold"] for p in mine],
            label=method.replace("_", "-").upper(),
            color=COLOURS.get(method),
            alpha=0.8,
        )
    ax.set_xlabel("KL(π ‖ π_SFT), summed over the response")
    ax.set_ylabel("mean gold reward")
    ax.set_title(f"Reward against KL (temperature {temperature:g})")
    return save_figure(plt, fig, ax, path)


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
