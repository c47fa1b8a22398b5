"""`rlhfdpo experiment`: the whole comparison as one command, redoing only what changed.

Each step is a stage run (`rlhfdpo <stage> <config> --set ...`) in its own process. A step is
reused when its output exists and its stamp matches: the hash of its resolved config and of the
stamps of the steps it reads (`after`). So editing the DPO sweep re-runs the DPO runs and the
comparison, not the SFT model, the pairs or PPO. A `seeded` step runs once per seed of `seeds`.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

from pipeline.config import ExperimentConfig, StepSpec, load_config, to_dict
from pipeline.console import console, plain
from pipeline.errors import RunFailed
from pipeline.stages import STAGES

STAMP = ".experiment-stamp"


def step_stamp(step: StepSpec, upstream: list[str]) -> tuple[str, Path]:
    """(stamp, output directory) of a step, from its resolved config and its inputs' stamps.

    The config is resolved with model-path checks as the stage will see them; a step whose inputs
    are not there yet is always run (its stamp cannot match).
    """
    cfg = load_config(STAGES[step.stage].config, step.config, step.set)
    text = json.dumps({"config": to_dict(cfg), "inputs": upstream}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16], Path(cfg.output_dir)


def finished(output: Path, stage: str) -> bool:
    return (output / STAGES[stage].output).is_file()


def seed_key(stage: str) -> str:
    """Where a stage keeps its seed: train.seed in the training stages, seed in the others."""
    return "train.seed" if hasattr(STAGES[stage].config(), "train") else "seed"


def expand_seeds(cfg: ExperimentConfig) -> list[tuple[StepSpec, list[str]]]:
    """Each step as it runs, with the names of the runs it reads: a seeded step once per seed
    (named step/seed-N, its seed set to N, {seed} in its overrides filled in), a compare step told the seeds.
    A step that reads a seeded step reads every seed's run of it."""
    runs_of: dict[str, list[str]] = {}
    out = []
    for step in cfg.steps:
        after = [name for upstream in step.after for name in runs_of[upstream]]
        if step.seeded:
            runs_of[step.name] = []
            for seed in cfg.seeds:
                name = f"{step.name}/seed-{seed}"
                overrides = [o.replace("{seed}", str(seed)) for o in step.set] + [f"{seed_key(step.stage)}={seed}"]
                out.append((StepSpec(name, step.stage, step.config, overrides, step.after), after))
                runs_of[step.name].append(name)
            continue
        overrides = list(step.set)
        if step.stage == "compare":
            overrides.append(f"seeds={json.dumps(cfg.seeds)}")
        out.append((StepSpec(step.name, step.stage, step.config, overrides, step.after), after))
        runs_of[step.name] = [step.name]
    return out


def run(cfg: ExperimentConfig) -> Path:
    stamps: dict[str, str] = {}
    output = Path(".")
    for step, after in expand_seeds(cfg):
        stamp, output = step_stamp(step, [stamps[name] for name in after])
        stamps[step.name] = stamp
        stamp_file = output / STAMP
        if finished(output, step.stage) and stamp_file.is_file() and stamp_file.read_text() == stamp:
            console.print(f"[green]reused[/green] {plain(step.name)} ({plain(output)})")
            continue
        console.print(
            f"[bold]running[/bold] {plain(step.name)}: {plain(STAGES[step.stage].command_line(step.config))} {plain(' '.join(step.set))}"
        )
        command = [sys.executable, "-m", "pipeline.cli", *STAGES[step.stage].command, step.config]
        command += [arg for override in step.set for arg in ("--set", override)]
        command += ["--overwrite"]  # the step's output is stale (its stamp differs) or unfinished: replace it
        code = subprocess.run(command, check=False).returncode
        if code != 0:
            raise RunFailed(f"step {step.name} failed with exit status {code}; finished steps are kept and reused")
        stamp_file.write_text(stamp)
    return output
