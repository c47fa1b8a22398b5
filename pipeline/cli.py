"""The `rlhfdpo` command line: one command per stage, each `load_config` then `run`.

Bad configs and bad data end in one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from pipeline.config import (
    CompareConfig,
    ConfigError,
    DPOConfig,
    ExperimentConfig,
    LaunchConfig,
    PairsConfig,
    PPOConfig,
    RewardConfig,
    SFTConfig,
    load_config,
)
from pipeline.data.records import DataError

app = typer.Typer(
    add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
    help="RLHF (SFT, reward model, PPO) and DPO on the same footing.",
)
data_app = typer.Typer(no_args_is_help=True, help="Look at and build datasets.")
app.add_typer(data_app, name="data")

ConfigPath = Annotated[Path, typer.Argument(help="The stage's YAML config.")]
Overrides = Annotated[
    Optional[list[str]], typer.Option("--set", help="Override a key: --set optim.lr=1e-4 (repeatable).")
]
NumProcesses = Annotated[
    Optional[int], typer.Option("--num-processes", help="Shard over N processes (launch.num_processes).")
]
Resume = Annotated[bool, typer.Option("--resume", help="Continue from the last checkpoint in output_dir.")]


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def _load(cls: type, config: Path, overrides: list[str] | None, num_processes: int | None):
    overrides = list(overrides or [])
    if num_processes is not None:
        overrides.append(f"launch.num_processes={num_processes}")
    return load_config(cls, config, overrides), overrides


def _run_stage(stage: str, cls: type, config: Path, overrides, num_processes, resume: bool) -> None:
    """Load and check the config, re-launch under accelerate if asked for, else run here.

    The stage module (and with it torch and transformers) is imported only once the config is
    known to be good, so a typo costs a fraction of a second.
    """
    try:
        cfg, overrides = _load(cls, config, overrides, num_processes)
        from pipeline.launch import inside_launch, relaunch

        launch: LaunchConfig = getattr(cfg, "launch", LaunchConfig())  # compare runs in one process
        if launch.num_processes > 1 and not inside_launch():
            command = ["data", stage] if stage == "pairs" else [stage]
            args = [*command, str(config), *[a for o in overrides for a in ("--set", o)]]
            code = relaunch(launch, args + (["--resume"] if resume else []))
            raise typer.Exit(code)
        importlib.import_module(f"pipeline.{stage}").run(cfg, resume=resume)
    except (ConfigError, DataError) as err:
        _fail(str(err))
    except OSError as err:  # a model folder or data file that is not there, a hub that cannot be reached
        _fail(f"{type(err).__name__}: {err}")


@app.command()
def sft(config: ConfigPath, overrides: Overrides = None, num_processes: NumProcesses = None, resume: Resume = False) -> None:
    """Supervised fine-tuning, loss on response tokens only."""
    _run_stage("sft", SFTConfig, config, overrides, num_processes, resume)


@app.command()
def reward(config: ConfigPath, overrides: Overrides = None, num_processes: NumProcesses = None, resume: Resume = False) -> None:
    """Bradley-Terry reward model (with Llama 2's margin) on preference pairs."""
    _run_stage("reward", RewardConfig, config, overrides, num_processes, resume)


@app.command()
def dpo(config: ConfigPath, overrides: Overrides = None, num_processes: NumProcesses = None, resume: Resume = False) -> None:
    """Direct preference optimisation (DPO, conservative DPO, IPO, hinge, RPO) from the SFT model."""
    _run_stage("dpo", DPOConfig, config, overrides, num_processes, resume)


@app.command()
def ppo(config: ConfigPath, overrides: Overrides = None, num_processes: NumProcesses = None, resume: Resume = False) -> None:
    """PPO against the reward model (or the gold reward: PPO-GT) with a KL penalty to the SFT model."""
    _run_stage("ppo", PPOConfig, config, overrides, num_processes, resume)


@app.command()
def compare(config: ConfigPath, overrides: Overrides = None) -> None:
    """Sample every policy on held-out prompts; win rates, the reward-vs-KL frontier, cost: report.md."""
    _run_stage("compare", CompareConfig, config, overrides, None, resume=False)


@app.command()
def experiment(config: ConfigPath, overrides: Overrides = None) -> None:
    """Run a list of stages in order (make compare), reusing those whose config and inputs are unchanged."""
    _run_stage("experiment", ExperimentConfig, config, overrides, None, resume=False)


@data_app.command("pairs")
def data_pairs(config: ConfigPath, overrides: Overrides = None, num_processes: NumProcesses = None) -> None:
    """Sample k completions per prompt, score them with the gold reward, write preference pairs."""
    _run_stage("pairs", PairsConfig, config, overrides, num_processes, resume=False)


@data_app.command("inspect")
def data_inspect(
    config: ConfigPath,
    overrides: Overrides = None,
    examples: Annotated[int, typer.Option(help="How many rendered examples to show.")] = 3,
) -> None:
    """Counts, drops by reason, length percentiles and rendered examples of a stage's data."""
    from pipeline.data.inspect import inspect_data

    try:
        cfg = _load_any_stage(config, overrides)
        inspect_data(cfg, examples)
    except (ConfigError, DataError) as err:
        _fail(str(err))
    except OSError as err:
        _fail(f"{type(err).__name__}: {err}")


def _load_any_stage(config: Path, overrides: list[str] | None):
    """The config as whichever training stage it is written for: the one named like the file first."""
    from pipeline.config import STAGES

    with_data = [name for name in STAGES if name not in ("compare", "experiment")]
    order = sorted(with_data, key=lambda name: name not in config.stem)
    first_error = None
    for name in order:
        try:
            return load_config(STAGES[name], config, overrides)
        except ConfigError as err:
            first_error = first_error or err
    raise first_error


def main() -> None:
    _quiet_libraries()
    app(prog_name="rlhfdpo")


def _quiet_libraries() -> None:
    """Our progress bars and tables are the output; the libraries' load reports and bars are noise."""
    import os

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


if __name__ == "__main__":
    sys.exit(main())
