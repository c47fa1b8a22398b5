"""`rlhfdpo experiment`: the whole comparison as one command, redoing only what changed.

Each step is a stage run (`rlhfdpo <stage> <config> --set ...`) in its own process. A step is
reused when its output exists and its stamp matches: the hash of its resolved config and of the
stamps of the steps it reads (`after`). So editing the DPO sweep re-runs the DPO runs and the
comparison, not the SFT model, the pairs or PPO.
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


def step_stamp(step: StepSpec, upstream: dict[str, str]) -> tuple[str, Path]:
    """(stamp, output directory) of a step, from its resolved config and its inputs' stamps.

    The config is resolved with model-path checks as the stage will see them; a step whose inputs
    are not there yet is always run (its stamp cannot match).
    """
    cfg = load_config(STAGES[step.stage].config, step.config, step.set)
    text = json.dumps({"config": to_dict(cfg), "inputs": [upstream[name] for name in step.after]}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16], Path(cfg.output_dir)


def finished(output: Path, stage: str) -> bool:
    return (output / STAGES[stage].output).is_file()


def run(cfg: ExperimentConfig) -> Path:
    stamps: dict[str, str] = {}
    output = Path(".")
    for step in cfg.steps:
        stamp, output = step_stamp(step, stamps)
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
