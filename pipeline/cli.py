"""The `rlhfdpo` command line: one command per stage, each `load_config` then `run`.

Bad configs and bad data end in one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Annotated

import typer

from pipeline.config import STAGES, LaunchConfig, config_from_dict, load_config
from pipeline.errors import ConfigError, DataError, InputError, RunFailed, report_failure
from pipeline.stages import STAGES as STAGE_TABLE
from pipeline.stages import Stage

app = typer.Typer(
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="RLHF (SFT, reward model, PPO) and DPO on the same footing.",
)
data_app = typer.Typer(no_args_is_help=True, help="Look at and build datasets.")
app.add_typer(data_app, name="data")
config_app = typer.Typer(no_args_is_help=True, help="Show a stage's config, or write one for your model and data.")
app.add_typer(config_app, name="config")


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"rlhfdpo {version('rlhfdpo')}")
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[
        bool, typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """RLHF (SFT, reward model, PPO) and DPO on the same footing."""


ConfigPath = Annotated[Path, typer.Argument(help="The stage's YAML config.")]
Overrides = Annotated[list[str] | None, typer.Option("--set", help="Override a key: --set optim.lr=1e-4 (repeatable).")]
NumProcesses = Annotated[
    int | None, typer.Option("--num-processes", help="Shard over N processes (launch.num_processes).")
]
Resume = Annotated[bool, typer.Option("--resume", help="Continue from the last checkpoint in output_dir.")]
Overwrite = Annotated[
    bool, typer.Option("--overwrite", help="Replace what an earlier run wrote in output_dir (other files are kept).")
]


def _fail(message: str, code: int = 2) -> None:
    report_failure(code, message)
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _load(cls: type, config: Path, overrides: list[str] | None, num_processes: int | None):
    overrides = list(overrides or [])
    if num_processes is not None:
        overrides.append(f"launch.num_processes={num_processes}")
    return load_config(cls, config, overrides), overrides


def _run_stage(stage: Stage, config: Path, overrides, num_processes=None, resume=False, overwrite=False) -> None:
    """Load and check the config, re-launch under accelerate if asked for, else run here.

    The stage module (and with it torch and transformers) is imported only once the config is
    known to be good, so a typo costs a fraction of a second.
    """
    try:
        cfg, overrides = _load(stage.config, config, overrides, num_processes)
        _check_trackers(cfg, config)
        from pipeline.launch import inside_launch, relaunch

        launch: LaunchConfig = getattr(cfg, "launch", LaunchConfig())  # compare runs in one process
        if (launch.num_processes > 1 or launch.always_launch) and not inside_launch():
            args = [*stage.command, str(config), *[a for o in overrides for a in ("--set", o)]]
            args += ["--resume"] if resume else []
            args += ["--overwrite"] if overwrite else []
            code, message = relaunch(launch, args)
            if message:
                typer.echo(f"error: {message}", err=True)
            raise typer.Exit(code)
        options = {"resume": resume} if stage.checkpoints else {}
        options |= {"overwrite": overwrite} if stage.output else {}
        importlib.import_module(stage.module).run(cfg, **options)
    except (ConfigError, DataError, InputError) as err:
        _fail(str(err))
    except RunFailed as err:
        _fail(str(err), code=1)
    except OSError as err:  # a model folder or data file that is not there, a hub that cannot be reached
        _fail(f"{type(err).__name__}: {err}")


def _check_trackers(cfg, config: Path) -> None:
    """A tracker in train.report_to whose package is missing fails here, before any model loads."""
    from pipeline.tracking import missing_trackers_problem

    train = getattr(cfg, "train", None)
    problem = missing_trackers_problem(train.report_to) if train is not None else None
    if problem:
        raise ConfigError(f"{config}: {problem}")


def _stage_command(stage: Stage):
    """The command of a stage, with the options it takes: --num-processes, --resume, --overwrite."""
    if stage.checkpoints:

        def command(
            config: ConfigPath,
            overrides: Overrides = None,
            num_processes: NumProcesses = None,
            resume: Resume = False,
            overwrite: Overwrite = False,
        ) -> None:
            _run_stage(stage, config, overrides, num_processes, resume, overwrite)
    elif stage.sharded:

        def command(
            config: ConfigPath,
            overrides: Overrides = None,
            num_processes: NumProcesses = None,
            overwrite: Overwrite = False,
        ) -> None:
            _run_stage(stage, config, overrides, num_processes, overwrite=overwrite)
    elif stage.output:

        def command(config: ConfigPath, overrides: Overrides = None, overwrite: Overwrite = False) -> None:
            _run_stage(stage, config, overrides, overwrite=overwrite)
    else:

        def command(config: ConfigPath, overrides: Overrides = None) -> None:
            _run_stage(stage, config, overrides)

    command.__doc__ = stage.help
    return command


for _stage in STAGE_TABLE.values():
    (data_app if _stage.command[0] == "data" else app).command(_stage.command[-1])(_stage_command(_stage))


@data_app.command("inspect")
def data_inspect(
    config: ConfigPath,
    overrides: Overrides = None,
    examples: Annotated[int, typer.Option(help="How many rendered examples to show.")] = 3,
    stage: Annotated[
        str | None,
        typer.Option(
            help="The stage the config is for (sft, pairs, reward, dpo, ppo); default: the one its first line or name says."
        ),
    ] = None,
) -> None:
    """Counts, drops by reason, length percentiles and rendered examples of a stage's data."""
    try:
        cfg = load_config(STAGES[_stage_of(config, stage)], config, overrides)
        from pipeline.data.inspect import inspect_data  # torch and transformers, once the config is good

        inspect_data(cfg, examples)
    except (ConfigError, DataError, InputError) as err:
        _fail(str(err))
    except OSError as err:
        _fail(f"{type(err).__name__}: {err}")


@app.command("doctor")
def doctor(
    runs: Annotated[list[Path], typer.Argument(help="Run folders (each with a metrics.jsonl).")],
    strict: Annotated[bool, typer.Option(help="Exit 1 when any run shows a problem (not just a warning).")] = False,
) -> None:
    """Name the known failure modes a run's metrics show (collapsing EOS, exploding KL, over-optimisation, ...)."""
    from pipeline.doctor import PROBLEM, diagnose  # pure Python: no torch

    problems, unreadable = 0, []
    for run in runs:
        try:
            found = diagnose(run)
        except InputError as err:
            unreadable.append(str(err))
            continue
        typer.echo(f"{run}: " + ("no known failure mode in its metrics" if not found else f"{len(found)} finding(s)"))
        for diagnosis in found:
            typer.echo(f"  {diagnosis.line()}")
        problems += sum(d.severity == PROBLEM for d in found)
    if unreadable:  # every readable run is reported first; the unreadable ones end the command
        _fail("; ".join(unreadable))
    if strict and problems:
        raise typer.Exit(1)


DATA_STAGES = tuple(name for name, stage in STAGE_TABLE.items() if stage.reads_data)


def _stage_of(config: Path, named: str | None) -> str:
    """The stage a config is for: as named, else from its first line (`# rlhfdpo dpo ...`), else its file name.

    `data inspect` then checks the config with that stage's schema, exactly as the stage would.
    """
    if named is not None:
        if named not in DATA_STAGES:
            raise ConfigError(f"--stage: '{named}' reads no data; one of {', '.join(DATA_STAGES)}")
        return named
    try:
        first = config.read_text(encoding="utf-8").splitlines()[0] if config.is_file() else ""
    except (UnicodeDecodeError, IndexError):
        first = ""
    words = first.lstrip("# ").split()
    if len(words) >= 2 and words[0] == "rlhfdpo":
        said = words[2] if words[1] == "data" and len(words) > 2 else words[1]
        if said in DATA_STAGES:
            return said
    by_name = [name for name in DATA_STAGES if name in config.stem]
    if len(by_name) == 1:
        return by_name[0]
    raise ConfigError(f"{config}: cannot tell which stage this config is for; pass --stage ({', '.join(DATA_STAGES)})")


StageName = Annotated[str, typer.Argument(help="sft, pairs, reward, dpo, ppo, compare or experiment.")]


@config_app.command("show")
def config_show(
    stage: StageName,
    config: Annotated[Path | None, typer.Argument(help="A config to resolve; without it, the defaults.")] = None,
    overrides: Overrides = None,
) -> None:
    """Print a stage's whole config as commented YAML: its defaults, or CONFIG as the stage will see it."""
    from pipeline.config.docs import commented_yaml

    try:
        cls = _stage_class(stage)
        if config is None:
            cfg = config_from_dict(cls, {}, overrides, check=False)
            header = [f"the default config of `rlhfdpo {stage}`; copy it, edit it, run it"]
        else:
            cfg = load_config(cls, config, overrides)
            header = [f"{config} as `rlhfdpo {stage}` sees it, every default filled in"]
        typer.echo(commented_yaml(cfg, header), nl=False)
    except ConfigError as err:
        _fail(str(err))


@config_app.command("new")
def config_new(
    stage: StageName,
    model: Annotated[str, typer.Option("--model", help="A hub id, a local model folder, or 'scratch'.")],
    data: Annotated[str, typer.Option("--data", help="A local data file or a hub dataset id.")],
    fmt: Annotated[
        str | None, typer.Option("--format", help="The data format; read from the columns if not given.")
    ] = None,
    reward: Annotated[
        str | None, typer.Option("--reward", help="ppo: the reward model (else the gold reward).")
    ] = None,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Where to write it (default: STAGE.yaml here).")
    ] = None,
) -> None:
    """Write a commented starting config for your model and data, after checking both on the spot."""
    from pipeline.config.docs import commented_yaml, starting_config
    from pipeline.data.inspect import inspect_data

    try:
        if stage not in DATA_STAGES:
            raise ConfigError(f"config new: '{stage}' is not a training stage; one of {', '.join(DATA_STAGES)}")
        target = output or Path(f"{stage}.yaml")
        if target.exists():
            raise ConfigError(f"{target} already exists; pass --output to write elsewhere")
        raw = starting_config(stage, model, data, fmt, reward)
        cfg = config_from_dict(STAGES[stage], raw)
        inspect_data(cfg, 1)  # reads, adapts and tokenizes the data as the stage would; drops are reported
        command = STAGE_TABLE[stage].command_line(str(target))
        header = [
            command,
            f"written by `rlhfdpo config new {stage}` for {model} and {data};",
            "every key is shown with its default unless set for your model and data.",
        ]
        target.write_text(commented_yaml(cfg, header))
        typer.echo(f"wrote {target}; run it with: {command}")
    except (ConfigError, DataError, InputError) as err:
        _fail(str(err))
    except OSError as err:
        _fail(f"{type(err).__name__}: {err}")


def _stage_class(stage: str) -> type:
    if stage not in STAGES:
        raise ConfigError(f"no stage '{stage}'; one of {', '.join(STAGES)}")
    return STAGES[stage]


def main() -> None:
    _quiet_libraries()
    try:
        app(prog_name="rlhfdpo")
    except SystemExit as done:  # how typer ends every command
        if _launched_rank():
            from pipeline.launch import end_launched_process

            end_launched_process(done.code if isinstance(done.code, int) else 0 if done.code is None else 1)
        raise
    except Exception as err:  # a bug: the traceback follows; a launched rank also leaves its one line
        report_failure(1, f"{type(err).__name__}: {err}")
        raise


def _launched_rank() -> bool:
    import os

    return "LOCAL_RANK" in os.environ and os.environ.get("WORLD_SIZE", "1") != "1"


def _quiet_libraries() -> None:
    """Our progress bars and tables are the output; the libraries' load reports and bars are noise."""
    import os

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


if __name__ == "__main__":
    sys.exit(main())
