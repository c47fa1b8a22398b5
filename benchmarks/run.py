"""`make bench` (`python -m benchmarks.run`): our stages against TRL, our sampler against `generate`.

Writes <out>/bench.json (every number, with the settings that made it) and <out>/bench.md (the
tables), and prints the tables. Each training run is its own process (benchmarks/worker.py).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import fixtures as fixture_module
from benchmarks.hardware import matmul_params, matmul_peak_gflops, training_flops_per_token
from benchmarks.stats import steady_throughput, summarize

FULL = {
    "sizes": ["3M", "25M"],
    "steps": 16,
    "warmup": 3,
    "window": 3,
    "batch_size": 8,
    "seq_lens": [128, 256, 512, 1024],
    "batch_sizes": [2, 4, 8, 16],
    "sweep_steps": 10,
    "rollout": {"batch": 32, "prompt_len": 32, "new_tokens": 96},
    "ppo_iterations": 3,
    "rounds": 3,
    "prefix": {"shapes": ["hh", "builtin"], "batch": 8},
    "hh_sizes": ["25M"],
    "hh_steps": 8,  # pairs of ~590 tokens: half the steps of the random rows, the same warm-up and window
    "rl_anchor": {"size": "25M", "prompts": 8, "samples_per_prompt": 4, "new_tokens": 96, "iterations": 5},
}
# One GPU: two GPT-2 shapes that fill it sensibly, trained in bf16 weights; the 3M scaling sweep
# says nothing about a GPU and is left out.
GPU = {
    "sizes": ["89M", "308M"],
    "steps": 12,
    "warmup": 3,
    "window": 3,
    "batch_size": 16,
    "seq_lens": [],
    "batch_sizes": [],
    "sweep_steps": 0,
    "rollout": {"batch": 64, "prompt_len": 32, "new_tokens": 128},
    "ppo_iterations": 3,
    "rounds": 3,
    "dtype": "bfloat16",
    "variants": ["ours", "trl"],  # device time is short: equal settings only
}
QUICK = {
    "sizes": ["3M"],
    "steps": 6,
    "warmup": 2,
    "window": 2,
    "batch_size": 4,
    "seq_lens": [64, 128],
    "batch_sizes": [2, 4],
    "sweep_steps": 6,
    "rollout": {"batch": 4, "prompt_len": 8, "new_tokens": 8},
    "ppo_iterations": 2,
    "rounds": 2,
    "prefix": {"shapes": ["hh"], "batch": 2},
    "hh_sizes": ["3M"],
    "rl_anchor": {"size": "3M", "prompts": 2, "samples_per_prompt": 2, "new_tokens": 8, "iterations": 4},
}
STAGES = ("sft", "reward", "dpo")
# (label, framework, settings). The first and last run at equal settings: same random batches.
# "ours+grouped" adds train.group_by_length, which TRL's pair trainers cannot use (their datasets
# have no input_ids column for transformers' LengthGroupedSampler).
# "ours+packed" (SFT only) puts each batch's sequences end to end in one row (train.packing).
VARIANTS = [
    ("ours", "ours", {}),
    ("ours+grouped", "ours", {"ours": {"group_by_length": True}}),
    ("ours+packed", "ours", {"ours": {"packing": True}}),
    ("ours+shared", "ours", {"ours": {"share_prompt": True}}),
    ("trl", "trl", {}),
]
# A variant's stages, where not every stage. "ours+shared" computes each pair's prompt once
# (train.share_prompt, on in every shipped pair config).
ONLY_FOR = {"ours+packed": ("sft",), "ours+shared": ("reward", "dpo")}
# The PPO iteration's value model: its own network (the default, from the reward model) or a head on
# the policy's trunk.
PPO_VALUE_MODELS = {"separate": {}, "shared": {"value_model": "shared"}}
# Pairs shaped like HH-RLHF (benchmarks/fixtures.py): the pair stages on the plan's `hh_sizes`, with
# these variants only.
HH_STAGES = ("reward", "dpo")
HH_VARIANTS = ("ours+shared", "trl")  # the prompt once, as every shipped pair config; row-per-side: `prefix`


# What `--only` can pick; `training` is the stages on the random rows, `rollout` the sampler against
# `generate` and the phases of a PPO iteration.
SECTIONS = ("training", "training-hh", "rollout", "rl-anchor", "prefix", "scaling")


def _sections(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in SECTIONS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"{', '.join(unknown) or 'none'}: sections are {', '.join(SECTIONS)}")
    return names


def training_cells(plan: dict, shapes=("random", "hh")) -> list[tuple[str, str, str]]:
    """(stage, size, pair shape) of every timed training run, in the order a round runs them."""
    cells = []
    for size in plan["sizes"]:
        if "random" in shapes:
            cells += [(stage, size, "random") for stage in STAGES]
        if "hh" in shapes and size in plan.get("hh_sizes", []):
            cells += [(stage, size, "hh") for stage in HH_STAGES]
    return cells


def cell_variants(plan: dict, stage: str, shape: str, frameworks: list[str]) -> list[tuple[str, str, dict]]:
    return [
        v
        for v in VARIANTS
        if v[0] in plan.get("variants", [v[0]])
        and v[1] in frameworks
        and stage in ONLY_FOR.get(v[0], STAGES)
        and (shape != "hh" or v[0] in HH_VARIANTS)
    ]


REUSE = {"results": True}


def run_worker(spec: dict, out: Path, peak_on: str | None = None) -> dict:
    """One training run in a fresh process; returns its recorded step times and memory.

    `peak_on` ("cpu" or "cuda"): the result also holds `matmul_peak_gflops`, the higher of the matmul
    peaks measured just before and just after the run, so that its MFU is against what the machine
    could do while it ran: a shared machine's speed drifts over an hour-long bench, and one peak taken
    at the start would credit or blame every later row with the drift. A run whose result is there
    for the very same spec is reused (`--fresh` re-measures all).
    """
    out.mkdir(parents=True, exist_ok=True)
    spec_path, result_path = out / "spec.json", out / "result.json"
    if REUSE["results"] and result_path.is_file() and spec_path.is_file() and json.loads(spec_path.read_text()) == spec:
        return json.loads(result_path.read_text())
    result_path.unlink(missing_ok=True)
    spec_path.write_text(json.dumps(spec))
    before = matmul_peak_gflops(device=peak_on) if peak_on else None
    log = out / "log.txt"
    with log.open("w") as handle:
        code = subprocess.run(
            [sys.executable, "-m", "benchmarks.worker", str(spec_path), str(result_path)],
            stdout=handle,
            stderr=subprocess.STDOUT,
            env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
        ).returncode
    if code != 0:
        raise RuntimeError(f"{spec['framework']} {spec['stage']} {spec['size']} failed (exit {code}); see {log}")
    result = json.loads(result_path.read_text())
    if peak_on:
        result["matmul_peak_gflops"] = max(before, matmul_peak_gflops(device=peak_on))
        result_path.write_text(json.dumps(result))
    return result


def flops_per_token(stage: str, model_folder: str, seq_len: float) -> float:
    n, layers, d = matmul_params(model_folder, with_lm_head=stage != "reward")
    return training_flops_per_token(n, layers, d, seq_len)


def training_spec(stage: str, size: str, batch_size: int, steps: int, fx_path: Path, out: Path, **extra) -> dict:
    """A worker spec for a timed training run (benchmarks/worker.py): the bench's length, learning
    rate, warmup, seed and reference batch, and `extra` (framework, dtype, settings) on top."""
    return {
        "framework": "ours",
        "stage": stage,
        "size": size,
        "batch_size": batch_size,
        "steps": steps,
        "max_length": fixture_module.MAX_LENGTH,
        "lr": 1e-4,
        "warmup_steps": 2,
        "seed": 0,
        "reference_batch_size": 32,
        "fixtures": str(fx_path),
        "out": str(out),
        **extra,
    }


def ppo_spec(size: str, iterations: int, rollouts: int, new_tokens: int, fx_path: Path, out: Path, **extra) -> dict:
    """A worker spec for timed PPO iterations of `rollouts` rollouts of up to `new_tokens` tokens each."""
    return {
        "framework": "ours",
        "stage": "ppo",
        "size": size,
        "iterations": iterations,
        "rollout_batch_size": rollouts,
        "new_tokens": new_tokens,
        "batch_size": rollouts,
        "steps": iterations,
        "max_length": fixture_module.MAX_LENGTH,
        "max_prompt_length": 64,
        "kl_coef": 0.05,
        "lr": 1e-5,
        "warmup_steps": 0,
        "seed": 0,
        "fixtures": str(fx_path),
        "out": str(out),
        **extra,
    }


def training_rows(
    plan: dict,
    fx: dict,
    fx_path: Path,
    out: Path,
    peak: float,
    frameworks: list[str],
    device: dict,
    shapes=("random", "hh"),
) -> list[dict]:
    """Each (stage, size, variant) measured once per round. Within a round every variant of a stage
    runs back to back, in reverse order every other round, so that a neighbour's load which comes and
    goes falls on both sides of a ratio; the ratio to TRL is then taken within each round."""
    per_round: dict[tuple[str, str, str, str], list[dict]] = {}
    for round_ in range(plan["rounds"]):
        for stage, size, shape in training_cells(plan, shapes):
            variants = cell_variants(plan, stage, shape, frameworks)
            for label, framework, settings in variants if round_ % 2 == 0 else variants[::-1]:
                hh = shape == "hh"
                spec = training_spec(
                    stage,
                    size,
                    plan["batch_size"],
                    plan.get("hh_steps", plan["steps"]) if hh else plan["steps"],
                    fx_path,
                    out / "runs" / f"{label}-{stage}{'-hh' if hh else ''}-{size}" / f"round-{round_}",
                    framework=framework,
                    dtype=device["dtype"],
                    **(
                        {
                            "shape": "hh",
                            "max_length": fixture_module.HH_MAX_LENGTH,
                            "max_prompt_length": fixture_module.HH_MAX_PROMPT_LENGTH,
                        }
                        if hh
                        else {}
                    ),
                    **settings,
                )
                result = run_worker(spec, Path(spec["out"]), peak_on=device["type"])
                per_example = fx["tokens_per_example"]["sft" if stage == "sft" else "pair_hh" if hh else "pair"]
                seq_len = per_example if stage == "sft" else per_example / 2
                row = summarize(
                    result,
                    result.get("matmul_peak_gflops", peak),
                    flops_per_token(stage, fx["models"][size], seq_len),
                    per_example,
                    plan["warmup"],
                    plan["window"],
                )
                row["shape"] = shape
                if settings.get("ours", {}).get("share_prompt"):
                    # Throughput counts a pair's tokens as a row per side has them (the same work as
                    # TRL's); MFU counts what is computed, the prompt once.
                    row["mfu"] *= 1 - fx["prompt_share"]["pair_hh" if hh else "pair"] / 2
                per_round.setdefault((stage, size, shape, label), []).append(row)
                print(
                    f"  round {round_ + 1} {label:12s} {stage:6s} {shape:6s} {size:4s} {row['examples_per_s']:8.2f} ex/s "
                    f"{row['tokens_per_s']:9.0f} tok/s  {row['peak_rss_mb']:6.0f} MB RSS  "
                    f"{_gpu_mb(row)}MFU {row['mfu']:.1%} of {row['matmul_peak_gflops']:.0f} GFLOP/s",
                    flush=True,
                )
    return [over_rounds(rows, label) for (*_, label), rows in per_round.items()]


def over_rounds(rows: list[dict], label: str) -> dict:
    """One variant's rounds as one row: the median of each measure, the range of the throughputs,
    and each round's examples/s (for ratios within a round)."""
    row = {**rows[0], "framework": label, "rounds": len(rows)}
    for key in (
        "examples_per_s",
        "tokens_per_s",
        "mfu",
        "matmul_peak_gflops",
        "peak_rss_mb",
        "peak_gpu_mb",
        "time_to_first_step_s",
    ):
        values = [r[key] for r in rows if r.get(key) is not None]
        row[key] = statistics.median(values) if values else None
        if key in ("examples_per_s", "tokens_per_s", "matmul_peak_gflops") and values:
            row[f"{key}_range"] = [min(values), max(values)]
    row["examples_per_s_rounds"] = [r["examples_per_s"] for r in rows]
    row["tokens_per_s_rounds"] = [r["tokens_per_s"] for r in rows]
    return row


def scaling_rows(plan: dict, fx: dict, out: Path, peak: float) -> list[dict]:
    """Our DPO step on the 3M model against sequence length and batch size."""
    rows = []
    points = [(length, plan["batch_size"]) for length in plan["seq_lens"]]
    points += [(plan["seq_lens"][1], batch) for batch in plan["batch_sizes"] if batch != plan["batch_size"]]
    for length, batch in points:
        folder = out / "scaling" / f"len{length}"
        fx_path = folder / "fixtures.json"
        if not fx_path.is_file():
            # Rows of `length` words are over 2 tokens a word, so truncation cuts every sequence to
            # exactly `length` tokens: half prompt (max_prompt_length), half response.
            rows_ = fixture_module.pair_rows(
                256, 1, prompt_words=(length // 2, length // 2), response_words=(length, length)
            )
            sub = {
                **fx,
                "data": {
                    "pairs": str(fixture_module.write_jsonl(rows_, folder / "pairs.jsonl")),
                    "sft": str(
                        fixture_module.write_jsonl(
                            [{"prompt": r["prompt"], "completion": r["chosen"]} for r in rows_], folder / "sft.jsonl"
                        )
                    ),
                    "pairs_eval": fx["data"]["pairs_eval"],
                    "sft_eval": fx["data"]["sft_eval"],
                },
            }
            fx_path.write_text(json.dumps(sub))
        for stage in ("dpo",):
            spec = training_spec(
                stage, "3M", batch, plan["sweep_steps"], fx_path, folder / f"{stage}-b{batch}", max_length=length
            )
            result = run_worker(spec, Path(spec["out"]), peak_on="cpu")
            per_example = length if stage == "sft" else 2 * length
            row = summarize(
                result,
                result.get("matmul_peak_gflops", peak),
                flops_per_token(stage, fx["models"]["3M"], length),
                per_example,
                plan["warmup"],
                plan["window"],
            )
            rows.append({**row, "seq_len": length})
            print(
                f"  scaling {stage:4s} len {length:5d} batch {batch:3d}: {row['tokens_per_s']:9.0f} tok/s "
                f"{row['peak_rss_mb']:6.0f} MB  MFU {row['mfu']:.0%}",
                flush=True,
            )
    return rows


def _gpu_mb(row: dict) -> str:
    return f"{row['peak_gpu_mb']:6.0f} MB GPU  " if row.get("peak_gpu_mb") is not None else ""


def ppo_rows(plan: dict, fx: dict, fx_path: Path, out: Path, device: dict) -> tuple[list[dict], dict]:
    from benchmarks.rollout import rollout_speed

    rollouts = []
    for size in plan["sizes"]:
        row = {
            "size": size,
            **rollout_speed(
                fx["models"][size],
                **plan["rollout"],
                rounds=plan["rounds"],
                device_type=device["type"],
                dtype=device["dtype"],
            ),
        }
        rollouts.append(row)
        print(
            f"  rollout {size}: ours {row['ours_tokens_per_s']:.0f} tok/s, generate {row['generate_tokens_per_s']:.0f} "
            f"tok/s ({row['speedup']:.2f}x), same greedy outputs: {row['same_greedy_outputs']}",
            flush=True,
        )
    # The PPO iteration with a value model of its own (the reward model's copy, the default) and
    # with a value head on the policy's trunk (value_model: shared), in rounds, alternating.
    per_round: dict[str, list[dict]] = {}
    for round_ in range(plan["rounds"]):
        order = list(PPO_VALUE_MODELS)
        for label in order if round_ % 2 == 0 else order[::-1]:
            spec = ppo_spec(
                plan["sizes"][-1],
                plan["ppo_iterations"],
                plan["rollout"]["batch"],
                plan["rollout"]["new_tokens"],
                fx_path,
                out / "runs" / f"ours-ppo-{label}" / f"round-{round_}",
                dtype=device["dtype"],
                **PPO_VALUE_MODELS[label],
            )
            split = run_worker(spec, Path(spec["out"]))["ppo_phases"]
            per_round.setdefault(label, []).append(split)
            print(
                f"  round {round_ + 1} ppo iteration, {label} value model: "
                + ", ".join(f"{k} {v:.2f}s" for k, v in split.items()),
                flush=True,
            )
    iteration = {
        "size": spec["size"],
        "rollout_batch_size": spec["rollout_batch_size"],
        "seconds": {k: statistics.median(r[k] for r in per_round["separate"]) for k in per_round["separate"][0]},
        "variants": {
            label: {
                "seconds": {k: statistics.median(r[k] for r in rounds) for k in rounds[0]},
                "total_s_rounds": [sum(r.values()) for r in rounds],
            }
            for label, rounds in per_round.items()
        },
    }
    return rollouts, iteration


def rl_anchor_rows(plan: dict, fx_path: Path, out: Path, frameworks: list[str], device: dict) -> list[dict]:
    """Our critic-free PPO iteration (ppo.advantage grpo and rloo) against TRL's GRPOTrainer and
    RLOOTrainer at equal settings (benchmarks/worker.py run_trl_rl): each iteration samples
    `samples_per_prompt` completions of `prompts` prompts and takes one optimizer step on all of
    them. Completions/s over the iterations after the first, in rounds, the ratio within a round."""
    anchor = plan["rl_anchor"]
    completions = anchor["prompts"] * anchor["samples_per_prompt"]
    per_round: dict[tuple[str, str], list[dict]] = {}
    for round_ in range(plan["rounds"]):
        for method in ("grpo", "rloo"):
            order = [f for f in ("ours", "trl") if f in frameworks]
            for framework in order if round_ % 2 == 0 else order[::-1]:
                spec = ppo_spec(
                    anchor["size"],
                    anchor["iterations"],
                    anchor["prompts"],
                    anchor["new_tokens"],
                    fx_path,
                    out / "runs" / f"{framework}-{method}-{anchor['size']}" / f"round-{round_}",
                    framework=framework,
                    stage=method,
                    batch_size=completions,  # what one optimizer step (one iteration) trains on
                    dtype=device["dtype"],
                    ppo={
                        "advantage": method,
                        "samples_per_prompt": anchor["samples_per_prompt"],
                        "rollout_batch_size": anchor["prompts"],
                        "mini_batch_size": completions,
                        "micro_batch_size": completions,
                        "epochs": 1,
                    },
                )
                result = run_worker(spec, Path(spec["out"]))
                per_s = steady_throughput(result["step_times"], completions, warmup=1, window=1)
                row = {"completions_per_s": per_s, "peak_rss_mb": result["peak_rss_mb"]}
                if result.get("peak_gpu_mb") is not None:
                    row["peak_gpu_mb"] = result["peak_gpu_mb"]
                per_round.setdefault((method, framework), []).append(row)
                print(
                    f"  round {round_ + 1} {framework:4s} {method} {anchor['size']}: {per_s:.2f} completions/s "
                    f"({anchor['prompts']} prompts x {anchor['samples_per_prompt']}, {anchor['new_tokens']} new tokens), "
                    f"{row['peak_rss_mb']:.0f} MB RSS",
                    flush=True,
                )
    rows = []
    for (method, framework), rounds in per_round.items():
        rates = [r["completions_per_s"] for r in rounds]
        row = {
            "method": method,
            "framework": framework,
            **{k: v for k, v in anchor.items() if k != "iterations"},
            "completions_per_s": statistics.median(rates),
            "completions_per_s_range": [min(rates), max(rates)],
            "completions_per_s_rounds": rates,
            "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in rounds),
        }
        if rounds[0].get("peak_gpu_mb") is not None:
            row["peak_gpu_mb"] = statistics.median(r["peak_gpu_mb"] for r in rounds)
        rows.append(row)
    return rows


def prefix_rows(plan: dict, fx: dict) -> list[dict]:
    """Pairs with the prompt once against a row per side, on the largest size, per pair shape."""
    from benchmarks.prefix import prefix_sharing_speed

    size = plan["sizes"][-1]
    rows = []
    for shape in plan["prefix"]["shapes"]:
        row = {"size": size, **prefix_sharing_speed(fx["models"][size], shape, plan["prefix"]["batch"], plan["rounds"])}
        rows.append(row)
        print(
            f"  prompt once, {shape} pairs, {size}: {row['speedup']:.2f}x ({row['tokens_saved']:.0%} fewer tokens), "
            f"largest log-prob difference {row['max_logp_difference']:.1e}",
            flush=True,
        )
    return rows


def markdown(bench: dict) -> str:
    on_gpu = bench.get("device", {}).get("type") == "cuda"
    memory, memory_key = ("peak GPU memory", "peak_gpu_mb") if on_gpu else ("peak RSS", "peak_rss_mb")
    precision = "bf16" if on_gpu else "fp32"
    lines = [
        f"Measured {precision} matmul peak: **{bench['matmul_peak_gflops']:.0f} GFLOP/s** "
        f"({bench['machine']}); command: `{bench['command']}`",
        "",
    ]
    lines += ["Each measure: the median over rounds (min–max); ratios are taken within each round."]
    # every run's own peak: a row of rounds holds their range
    peaks = [
        peak
        for r in bench["training"] + bench.get("scaling", [])
        for peak in r.get("matmul_peak_gflops_range", [r.get("matmul_peak_gflops")])
        if peak
    ]
    if peaks:
        lines += [
            f"MFU is against the matmul peak measured just before and just after each run (the higher): "
            f"{min(peaks):.0f}–{max(peaks):.0f} GFLOP/s over this table's rows."
        ]
    if bench["training"]:
        lines += [
            "",
            f"| stage | size | framework | examples/s | tokens/s | {memory} (MB) | time to first step (s) | MFU |",
            "|---|---|---|---:|---:|---:|---:|---:|",
        ]
    by_key = {(_stage_name(r), r["size"], r["framework"]): r for r in bench["training"]}
    for r in bench["training"]:
        low, high = r["examples_per_s_range"]
        lines.append(
            f"| {_stage_name(r)} | {r['size']} | {r['framework']} | {r['examples_per_s']:.2f} ({low:.2f}–{high:.2f}) | "
            f"{_median_range(r['tokens_per_s'], r['tokens_per_s_range'])} | "
            f"{r[memory_key]:.0f} | {r['time_to_first_step_s']:.1f} | {r['mfu']:.1%} |"
        )
    if any(r.get("tokens_counted") for r in bench["training"]):
        lines += [
            "",
            "tokens/s: ours counts the tokens its timed steps batch (a pair's as a row per side has them); TRL's is "
            "its examples/s times the rows' mean tokens per example, which its random batches draw. The ratios "
            "below are of tokens/s.",
        ]
    if any(r["framework"] == "ours+shared" for r in bench["training"]):
        lines += [
            "",
            "ours+shared computes each pair's prompt once: its tokens/s counts a pair's tokens as a row per side "
            "has them (the same work as TRL's), its MFU the tokens it computes.",
        ]
    ratios = []
    for (stage, size, framework), r in by_key.items():
        other = by_key.get((stage, size, "trl"))
        if framework.startswith("ours") and other:
            within = [a / b for a, b in zip(r["tokens_per_s_rounds"], other["tokens_per_s_rounds"])]
            ratios.append(
                f"| {stage} | {size} | {framework} | {statistics.median(within):.2f}x ({min(within):.2f}–{max(within):.2f}) | "
                f"{r[memory_key] - other[memory_key]:+.0f} MB |"
            )
    if ratios:
        lines += [
            "",
            f"| stage | size | ours | ours / TRL throughput | ours − TRL {memory} |",
            "|---|---|---|---:|---:|",
            *ratios,
        ]
    if bench["rollout"]:
        lines += [
            "",
            "| rollouts | batch x new tokens | ours tok/s | generate tok/s | speedup | same greedy outputs |",
            "|---|---|---:|---:|---:|---|",
        ]
    for r in bench["rollout"]:
        low, high = r["speedup_range"]
        lines.append(
            f"| {r['size']} | {r['batch']} x {r['new_tokens']} | {_median_range(r['ours_tokens_per_s'], r['ours_tokens_per_s_range'])} | "
            f"{_median_range(r['generate_tokens_per_s'], r['generate_tokens_per_s_range'])} | "
            f"{r['speedup']:.2f}x ({low:.2f}–{high:.2f}) | {r['same_greedy_outputs']} |"
        )
    anchor = {(r["method"], r["framework"]): r for r in bench.get("rl_anchor", [])}
    if anchor:
        lines += [
            "",
            "| critic-free RL iteration | size | prompts x samples, new tokens | ours completions/s | TRL completions/s | "
            "ours / TRL | ours − TRL peak RSS |",
            "|---|---|---|---:|---:|---:|---:|",
        ]
    for method in ("grpo", "rloo"):
        ours, trl = anchor.get((method, "ours")), anchor.get((method, "trl"))
        if ours is None:
            continue
        cells = [
            f"{method} | {ours['size']} | {ours['prompts']} x {ours['samples_per_prompt']}, {ours['new_tokens']}",
            _median_range(ours["completions_per_s"], ours["completions_per_s_range"], 2),
        ]
        if trl is None:
            cells += ["-", "-", "-"]
        else:
            within = [a / b for a, b in zip(ours["completions_per_s_rounds"], trl["completions_per_s_rounds"])]
            cells += [
                _median_range(trl["completions_per_s"], trl["completions_per_s_range"], 2),
                f"{statistics.median(within):.2f}x ({min(within):.2f}–{max(within):.2f})",
                f"{ours['peak_rss_mb'] - trl['peak_rss_mb']:+.0f} MB",
            ]
        lines.append("| " + " | ".join(cells) + " |")
    if bench.get("prefix"):
        lines += [
            "",
            "| pairs, prompt once (train.share_prompt) | size | batch | prompt + response tokens | fewer tokens | "
            "policy step, row per side (s) | prompt once (s) | speedup | largest log-prob difference |",
            "|---|---|---:|---|---:|---:|---:|---:|---:|",
        ]
    for r in bench.get("prefix", []):
        low, high = r["speedup_range"]
        lines.append(
            f"| {r['shape']} | {r['size']} | {r['batch']} | {r['prompt_len']} + 2 x {r['response_len']} | "
            f"{r['tokens_saved']:.0%} | {r['per_side_s']:.3f} | {r['shared_s']:.3f} | {r['speedup']:.2f}x ({low:.2f}–{high:.2f}) | "
            f"{r['max_logp_difference']:.1e} |"
        )
    if bench.get("ppo_iteration"):
        iteration = bench["ppo_iteration"]
        variants = iteration.get("variants") or {"separate": {"seconds": iteration["seconds"]}}
        lines += [
            "",
            f"One PPO iteration ({iteration['size']}, {iteration['rollout_batch_size']} rollouts), the median "
            "seconds of each phase over rounds:",
            "",
            "| value model | " + " | ".join(variants["separate"]["seconds"]) + " | iteration | speedup |",
            "|---|" + "---:|" * (len(variants["separate"]["seconds"]) + 2),
        ]
        base = variants["separate"].get("total_s_rounds")
        for label, variant in variants.items():
            phases = variant["seconds"]
            total = sum(phases.values())
            speedup = "-"
            if base and label != "separate":
                within = [a / b for a, b in zip(base, variant["total_s_rounds"])]
                speedup = f"{statistics.median(within):.2f}x ({min(within):.2f}–{max(within):.2f})"
            lines.append(
                f"| {label} | "
                + " | ".join(f"{v:.2f} s ({v / total:.0%})" for v in phases.values())
                + f" | {total:.2f} s | {speedup} |"
            )
    if bench["scaling"]:
        lines += [
            "",
            "| scaling (ours, 3M) | seq len | batch | tokens/s | peak RSS (MB) | MFU |",
            "|---|---:|---:|---:|---:|---:|",
        ]
    for r in bench["scaling"]:
        lines.append(
            f"| {r['stage']} | {r['seq_len']} | {r['batch_size']} | {r['tokens_per_s']:.0f} | {r['peak_rss_mb']:.0f} | {r['mfu']:.0%} |"
        )
    return "\n".join(lines) + "\n"


def _stage_name(row: dict) -> str:
    return row["stage"] + (" (HH-shaped)" if row.get("shape") == "hh" else "")


def _median_range(median: float, bounds: list[float], digits: int = 0) -> str:
    return f"{median:.{digits}f} ({bounds[0]:.{digits}f}–{bounds[1]:.{digits}f})"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/bench")
    parser.add_argument("--quick", action="store_true", help="one small size, a few steps: checks that everything runs")
    parser.add_argument(
        "--skip-trl", action="store_true", help="our stages only (TRL is in the optional 'bench' extra)"
    )
    parser.add_argument("--fresh", action="store_true", help="re-measure runs whose results are already in --out")
    parser.add_argument(
        "--only",
        type=_sections,
        default=list(SECTIONS),
        help=f"comma-separated sections to measure, of {', '.join(SECTIONS)} (default: all)",
    )
    parser.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        default="auto",
        help="auto: the GPU plan (89M and 308M models, bf16) where CUDA is there, the CPU plan elsewhere",
    )
    args = parser.parse_args(argv)
    REUSE["results"] = not args.fresh
    import torch

    device_type = args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    if device_type == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the workers too: our stages would pick a GPU by themselves
    plan = QUICK if args.quick else GPU if device_type == "cuda" else FULL
    device = {"type": device_type, "dtype": plan.get("dtype", "float32")}
    frameworks = ["ours"] + ([] if args.skip_trl or importlib.util.find_spec("trl") is None else ["trl"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()

    peak = matmul_peak_gflops(device=device_type)
    print(f"{'bf16' if device_type == 'cuda' else 'fp32'} matmul peak: {peak:.0f} GFLOP/s", flush=True)
    fx_path = out / "fixtures" / "fixtures.json"
    fx = json.loads(fx_path.read_text()) if fx_path.is_file() else None
    if fx is None or "prompt_share" not in fx or not set(plan["sizes"]) <= set(fx["models"]):
        fx = fixture_module.build(fx_path.parent, sizes={size: fixture_module.SIZES[size] for size in plan["sizes"]})
    only = set(args.only)
    shapes = [shape for shape, section in (("random", "training"), ("hh", "training-hh")) if section in only]
    training = training_rows(plan, fx, fx_path, out, peak, frameworks, device, shapes)
    rollout, ppo_iteration = ppo_rows(plan, fx, fx_path, out, device) if "rollout" in only else ([], None)
    rl_anchor = (
        rl_anchor_rows(plan, fx_path, out, frameworks, device) if "rl_anchor" in plan and "rl-anchor" in only else []
    )
    prefix = prefix_rows(plan, fx) if "prefix" in plan and "prefix" in only else []  # on the CPU
    scaling = scaling_rows(plan, fx, out, peak) if "scaling" in only else []

    machine = f"{os.cpu_count()} CPU cores, torch {torch.__version__}, {torch.get_num_threads()} threads"
    if device_type == "cuda":
        machine = f"{torch.cuda.get_device_name()}, {machine}"
    bench = {
        "command": "python -m benchmarks.run"
        + (" --quick" if args.quick else "")
        + (" --skip-trl" if args.skip_trl else "")
        + (f" --device {args.device}" if args.device != "auto" else "")
        + (f" --only {','.join(args.only)}" if only != set(SECTIONS) else ""),
        "machine": machine,
        "device": device,
        "date": time.strftime("%Y-%m-%d"),
        "versions": {name: _version(name) for name in ("torch", "transformers", "accelerate", "trl")},
        "plan": plan,
        "matmul_peak_gflops": peak,
        "fixtures": fx,
        "training": training,
        "rollout": rollout,
        "ppo_iteration": ppo_iteration,
        "rl_anchor": rl_anchor,
        "prefix": prefix,
        "scaling": scaling,
        "wall_s": time.time() - started,
    }
    (out / "bench.json").write_text(json.dumps(bench, indent=2))
    table = markdown(bench)
    (out / "bench.md").write_text(table)
    print(table)
    return bench


def _version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    main()
