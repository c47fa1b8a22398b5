"""`python -m benchmarks.memory`: what LoRA and gradient checkpointing save, for DPO and PPO on the 25M model.

For each stage, full fine-tuning and LoRA (r=8, all-linear), each with train.gradient_checkpointing
off and on: trainable parameters, peak memory and time per step. Every run is a fresh process of the
bench's own worker (benchmarks/worker.py): peak RSS per run, and DPO's step time from the same
optimizer-step clock as `make bench`. A PPO "step" is one iteration (rollout, scoring, update), the
first left out. Prints a markdown table and writes it, with every number, under --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from benchmarks import fixtures as fixture_module
from benchmarks.run import ppo_spec as bench_ppo_spec
from benchmarks.run import run_worker, training_spec

LORA = {"r": 8, "alpha": 16.0, "target_modules": ["all-linear"]}
PLANS = {
    # DPO as `make bench` runs it; PPO smaller than the bench's (one epoch of 16 rollouts of up to 64
    # tokens, not four of 32 x 96), so that eight runs take minutes on 2 CPU cores, not an hour.
    "full": {
        "size": "25M",
        "dpo_steps": 10,
        "warmup": 3,
        "batch_size": 8,
        "ppo_iterations": 3,
        "rollouts": 16,
        "new_tokens": 64,
    },
    "quick": {
        "size": "3M",
        "dpo_steps": 5,
        "warmup": 2,
        "batch_size": 4,
        "ppo_iterations": 2,
        "rollouts": 4,
        "new_tokens": 8,
    },
}
VARIANTS = [  # (label, model settings, train settings)
    ("full", {}, {}),
    ("full + checkpointing", {}, {"gradient_checkpointing": True}),
    ("LoRA r=8 all-linear", {"lora": LORA}, {}),
    ("LoRA r=8 all-linear + checkpointing", {"lora": LORA}, {"gradient_checkpointing": True}),
]


def dpo_spec(plan: dict, fx_path: Path, out: Path, model: dict, train: dict) -> dict:
    return training_spec(
        "dpo",
        plan["size"],
        plan["batch_size"],
        plan["dpo_steps"],
        fx_path,
        out,
        dtype="float32",
        model=model,
        ours=train,
    )


def ppo_spec(plan: dict, fx_path: Path, out: Path, model: dict, train: dict) -> dict:
    return bench_ppo_spec(
        plan["size"],
        plan["ppo_iterations"],
        plan["rollouts"],
        plan["new_tokens"],
        fx_path,
        out,
        dtype="float32",
        model=model,
        ours=train,
        ppo={"epochs": 1},
    )


def measure(stage: str, label: str, result: dict, plan: dict) -> dict:
    metrics = [json.loads(line) for line in (Path(result["spec"]["out"]) / "run" / "metrics.jsonl").open()]
    params = next(m for m in metrics if "params/trainable" in m)
    if stage == "dpo":
        durations = [b - a for a, b in zip(result["step_times"], result["step_times"][1:])][plan["warmup"] :]
        step_s = statistics.median(durations)
    else:
        step_s = sum(result["ppo_phases"].values())
    return {
        "stage": stage,
        "variant": label,
        "trainable": params["params/trainable"],
        "total": params["params/total"],
        "peak_rss_mb": result["peak_rss_mb"],
        "step_s": step_s,
        **({"ppo_phases": result["ppo_phases"]} if stage == "ppo" else {}),
    }


def markdown(rows: list[dict], plan: dict) -> str:
    lines = [
        f"| stage | variant | trainable parameters (policy) | peak RSS (MB) | {'s per step (DPO) / iteration (PPO)'} |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    base = {r["stage"]: r for r in rows if r["variant"] == "full"}
    for r in rows:
        ref = base[r["stage"]]
        change = "" if r is ref else f" ({r['peak_rss_mb'] / ref['peak_rss_mb'] - 1:+.0%})"
        time_change = "" if r is ref else f" ({r['step_s'] / ref['step_s'] - 1:+.0%})"
        share = f"{r['trainable'] / 1e6:.3f}M ({r['trainable'] / r['total']:.1%})"
        lines.append(
            f"| {r['stage']} | {r['variant']} | {share} | {r['peak_rss_mb']:,.0f}{change} | "
            f"{r['step_s']:.2f}{time_change} |"
        )
    lines += [
        "",
        f"{plan['size']} model, DPO batches of {plan['batch_size']} pairs (median of steps {plan['warmup'] + 1}-"
        f"{plan['dpo_steps']}), PPO {plan['rollouts']} rollouts of up to {plan['new_tokens']} tokens, one epoch "
        f"(mean of iterations 2-{plan['ppo_iterations']}); PPO's value model is adapted the same way.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/bench-memory")
    parser.add_argument("--quick", action="store_true", help="the 3M model and a few steps: checks that it runs")
    parser.add_argument("--fresh", action="store_true", help="re-measure runs whose results are already in --out")
    args = parser.parse_args(argv)
    import os

    os.environ["CUDA_VISIBLE_DEVICES"] = ""  # a CPU measurement, as the README's table
    from benchmarks import run as bench_run

    bench_run.REUSE["results"] = not args.fresh
    plan = PLANS["quick" if args.quick else "full"]
    out = Path(args.out)
    fx_path = out / "fixtures" / "fixtures.json"
    fx = json.loads(fx_path.read_text()) if fx_path.is_file() else None
    if fx is None or plan["size"] not in fx["models"]:
        fixture_module.build(fx_path.parent, sizes={plan["size"]: fixture_module.SIZES[plan["size"]]})
    rows = []
    for stage, spec_of in (("dpo", dpo_spec), ("ppo", ppo_spec)):
        for label, model, train in VARIANTS:
            name = f"{stage}-{label.split()[0].lower()}{'-gc' if train else ''}"
            result = run_worker(spec_of(plan, fx_path, out / "runs" / name, model, train), out / "runs" / name)
            rows.append(measure(stage, label, result, plan))
            print(f"  {stage} {label}: {rows[-1]['peak_rss_mb']:.0f} MB, {rows[-1]['step_s']:.2f} s", flush=True)
    table = markdown(rows, plan)
    (out / "memory.json").write_text(json.dumps(rows, indent=2))
    (out / "memory.md").write_text(table)
    print(table)
    return rows


if __name__ == "__main__":
    main()
