"""`rlhfdpo experiment`: the whole comparison as one command, redoing only what changed.

Each step is a stage run (`rlhfdpo <stage> <config> --set ...`) in its own process. A step is
reused when its output exists and its stamp matches: the hash of its resolved config and of the
stamps of the steps it reads (`after`). So editing the DPO sweep re-runs the DPO runs and the
comparison, not the SFT model, the pairs or PPO. A `seeded` step runs once per seed of `seeds`.
A step that runs again (its output was removed or left unfinished) makes new outputs, so every step
that reads it runs again too: what a step hands on is its stamp and the id of the run that made it.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import ExperimentConfig, StepSpec, load_config, to_dict
from pipeline.console import console, plain
from pipeline.errors import RunFailed
from pipeline.stages import STAGES
from pipeline.step_server import ForkedStep, StepServer, forks_safely

STAMP = ".experiment-stamp"
LOG = "experiment.log"  # a step's output when several steps run at once


def step_stamp(step: StepSpec, upstream: list[str]) -> tuple[str, Path]:
    """(stamp, output directory) of a step, from its resolved config and its inputs' stamps.

    The config is resolved with model-path checks as the stage will see them; a step whose inputs
    are not there yet is always run (its stamp cannot match).
    """
    cfg = load_config(STAGES[step.stage].config, step.config, step.set)
    text = json.dumps({"config": to_dict(cfg), "inputs": upstream}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16], step_output(cfg)


def step_output(cfg) -> Path:
    """The folder a step's run leaves its output in: its output_dir, or, for an evaluation (whose
    output_dir is the compare's), its own folder inside it."""
    return Path(getattr(cfg, "result_dir", cfg.output_dir))


def finished(output: Path, stage: str) -> bool:
    return (output / STAGES[stage].output).is_file()


def seed_override(stage: str, seed: int) -> str:
    """How a seeded step is told its seed: train.seed in the training stages; the compare and its
    evaluations are told which training seeds' runs to read (their own seed, the sampling seed, stays);
    seed in the others."""
    fields = STAGES[stage].config()
    if hasattr(fields, "train"):
        return f"train.seed={seed}"
    return f"seeds=[{seed}]" if hasattr(fields, "seeds") else f"seed={seed}"


def reads_seeds(stage: str) -> bool:
    """Whether a stage reads every seed's runs (the compare and its evaluations)."""
    return hasattr(STAGES[stage].config(), "seeds")


def expand_seeds(cfg: ExperimentConfig) -> list[tuple[StepSpec, list[str]]]:
    """Each step as it runs, with the names of the runs it reads: a seeded step once per seed
    (named step/seed-N, its seed set to N, {seed} in its overrides filled in), a compare or evaluate step
    told the seeds. A seeded step that reads a seeded step reads that step's run of its own seed; an
    unseeded one reads every seed's run."""
    runs_of: dict[str, dict[int | None, str]] = {}  # step -> {seed (None: unseeded): run name}

    def reads(step: StepSpec, seed: int | None) -> list[str]:
        out = []
        for upstream in step.after:
            runs = runs_of[upstream]
            out += [runs[seed]] if seed is not None and seed in runs else list(runs.values())
        return out

    out = []
    for step in cfg.steps:
        if step.seeded:
            runs_of[step.name] = {}
            for seed in cfg.seeds:
                name = f"{step.name}/seed-{seed}"
                overrides = [o.replace("{seed}", str(seed)) for o in step.set] + [seed_override(step.stage, seed)]
                out.append((StepSpec(name, step.stage, step.config, overrides, step.after), reads(step, seed)))
                runs_of[step.name][seed] = name
            continue
        overrides = list(step.set)
        if reads_seeds(step.stage):
            overrides.append(f"seeds={json.dumps(cfg.seeds)}")
        out.append((StepSpec(step.name, step.stage, step.config, overrides, step.after), reads(step, None)))
        runs_of[step.name] = {None: step.name}
    return out


def slot_environment(slot: int, share: int, environ: dict[str, str], cpus: int, gpus: int) -> dict[str, str]:
    """The environment of a step in `slot` (0 to share - 1) while `share` steps run at once.

    Each gets its part of the CPU cores as OpenMP threads (unless OMP_NUM_THREADS is set: the
    user's choice stands) and, on a machine with GPUs, its own: slot i the i-th of every `share`
    visible GPUs, or, with fewer GPUs than steps, GPU i mod their number, shared. A step alone
    (share 1) gets the whole machine.
    """
    env = dict(environ)
    if share == 1:
        return env
    env.setdefault("OMP_NUM_THREADS", str(max(1, cpus // share)))
    visible = [d for d in environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()] or [
        str(i) for i in range(gpus)
    ]
    if visible:
        mine = visible[slot::share] if len(visible) >= share else [visible[slot % len(visible)]]
        env["CUDA_VISIBLE_DEVICES"] = ",".join(mine)
    return env


@dataclass
class Running:
    step: StepSpec
    stamp: str
    output: Path
    slot: int
    process: subprocess.Popen | ForkedStep
    started: float
    log: Path | None


def _start(
    step: StepSpec, stamp: str, output: Path, slot: int, share: int, gpus: int, logged: bool, server: StepServer | None
) -> Running:
    """Start a step in `slot`, sharing the machine with `share` - 1 others, as a fork of `server` or
    (None) a fresh process; `logged`: its output to a log file (several steps may run at once)
    rather than the terminal."""
    console.print(
        f"[bold]running[/bold] {plain(step.name)}: {plain(STAGES[step.stage].command_line(step.config))} "
        f"{plain(' '.join(step.set))}"
    )
    argv = [*STAGES[step.stage].command, step.config, *[arg for override in step.set for arg in ("--set", override)]]
    argv += ["--overwrite"]  # the step's output is stale (its stamp differs) or unfinished: replace it
    env = slot_environment(slot, share, dict(os.environ), os.cpu_count() or 1, gpus)
    log = None
    if logged:
        # Several at once would interleave line by line: each writes to a log beside its run (a stage
        # keeps the files it did not write in its output_dir, so --overwrite leaves the log alone).
        output.mkdir(parents=True, exist_ok=True)
        log = output / LOG
    if server is not None:
        process = server.start(step.name, argv, env, log)
    elif log is None:  # one step at a time: its output streams to the terminal as a stage's own would
        process = subprocess.Popen([sys.executable, "-m", "pipeline.cli", *argv], env=env)
    else:
        with log.open("w") as handle:
            process = subprocess.Popen(
                [sys.executable, "-m", "pipeline.cli", *argv], env=env, stdout=handle, stderr=subprocess.STDOUT
            )
    return Running(step, stamp, output, slot, process, time.monotonic(), log)


def run(cfg: ExperimentConfig) -> Path:
    """Run every step whose stamp changed, `cfg.jobs` at a time, each as soon as the steps it reads
    (`after`) have finished; with jobs 1 in the order they are listed. A failed step stops new starts;
    the running ones finish (and are kept), then the run fails naming the step and its log."""
    plan = expand_seeds(cfg)
    gpus = _cuda_devices() if cfg.jobs > 1 else 0
    stamps: dict[str, str] = {}  # the steps finished or reused
    outputs: dict[str, Path] = {}
    pending = list(plan)
    running: list[Running] = []
    failed: list[tuple[Running, int]] = []
    server: StepServer | None = None  # started with the first step that is not reused
    try:
        while pending or running:
            while not failed and len(running) < cfg.jobs:
                ready = [(step, after) for step, after in pending if all(name in stamps for name in after)]
                if not ready:
                    break
                step, after = ready[0]
                pending.remove((step, after))
                stamp, outputs[step.name] = step_stamp(step, [stamps[name] for name in after])
                kept = _reusable(outputs[step.name], step.stage, stamp)
                if kept:
                    console.print(f"[green]reused[/green] {plain(step.name)} ({plain(outputs[step.name])})")
                    stamps[step.name] = kept
                    continue
                slot = min(set(range(cfg.jobs)) - {r.slot for r in running})
                # Started with nothing running and nothing else ready, a step runs alone to its end (a
                # step becomes ready only when one finishes): it gets the whole machine.
                share = 1 if not running and len(ready) == 1 else cfg.jobs
                if server is None and cfg.fork_steps and forks_safely():
                    server = StepServer(dict(os.environ))
                running.append(_start(step, stamp, outputs[step.name], slot, share, gpus, cfg.jobs > 1, server))
            if not running:
                break  # what is left waits on a failed step
            done = _wait_for_one(running)
            running.remove(done)
            seconds = time.monotonic() - done.started
            if done.process.returncode != 0:
                failed.append((done, done.process.returncode))
                console.print(f"[red]failed[/red] {plain(done.step.name)} after {seconds:.0f} s")
                continue
            made = f"{done.stamp} {uuid.uuid4().hex[:12]}"  # this run's outputs, not only its config
            (done.output / STAMP).write_text(made)
            stamps[done.step.name] = made
            console.print(f"[green]finished[/green] {plain(done.step.name)} in {seconds:.0f} s")
    finally:
        for r in running:  # the runner itself was interrupted or failed: no step goes on unwatched
            r.process.terminate()
            r.process.wait()
        if server is not None:
            server.close()
    if failed:
        done, code = failed[0]
        where = ""
        if done.log:
            console.print(plain("\n".join(done.log.read_text(errors="replace").splitlines()[-20:])))
            where = f" (its output: {done.log})"
        raise RunFailed(
            f"step {done.step.name} failed with exit status {code}{where}; finished steps are kept and reused"
        )
    return outputs[plan[-1][0].name]


def _reusable(output: Path, stage: str, stamp: str) -> str | None:
    """What a finished output whose stamp matches hands on to the steps that read it ("stamp run-id"),
    or None when the step must run. A stamp written before run ids were kept is the stamp alone."""
    path = output / STAMP
    if not finished(output, stage) or not path.is_file():
        return None
    recorded = path.read_text().strip()
    return recorded if stamp in (recorded, recorded.rpartition(" ")[0]) else None


def _wait_for_one(running: list[Running]) -> Running:
    while True:
        for r in running:
            if r.process.poll() is not None:
                return r
        time.sleep(0.2)


def _cuda_devices() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0
