"""Experiment trackers (`train.report_to`): TensorBoard, Weights & Biases, MLflow, Trackio.

A tracker gets exactly the records metrics.jsonl gets, as each is written, and metrics.jsonl stays
the source of truth: a record's numeric fields (bools as 0/1) go to every tracker at the record's
step; lists and text stay in metrics.jsonl alone. Only the main process opens trackers.

- tensorboard: event files in `<run_dir>/tensorboard/`, flushed after every record;
- wandb: a run named after the run directory in project $WANDB_PROJECT (default "rlhfdpo"), its
  files under `<run_dir>/wandb/` (or $WANDB_DIR); WANDB_MODE=offline keeps it on disk;
- mlflow: a run in experiment $MLFLOW_EXPERIMENT_NAME (default "rlhfdpo") at $MLFLOW_TRACKING_URI,
  or in a file store at `<run_dir>/mlruns/` when that is unset;
- trackio: a run in project "rlhfdpo" of trackio's local store ($TRACKIO_DIR).

A resumed run logs from its checkpoint's step on, as metrics.jsonl keeps what came before: the
TensorBoard events the interrupted run wrote past the checkpoint are purged, and W&B, MLflow and
Trackio start a new run under the same name (their runs cannot rewind a step).

A tracker that cannot start fails the run before its first step: it was asked for, and nothing is
lost yet. One that fails later is stopped with one warning and the run goes on: a dashboard is not
worth a training run, and metrics.jsonl, written before any tracker is called, has every record.
"""

from __future__ import annotations

import atexit
import importlib.util
import os
import shutil
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

from pipeline.console import console, plain
from pipeline.errors import RunFailed

PROJECT = "rlhfdpo"  # the W&B project, MLflow experiment and Trackio project when the environment names none
MLFLOW_PARAM_LIMIT = 100  # params one MLflow log_batch call takes
MLFLOW_VALUE_LIMIT = 500  # characters of a param value every MLflow version stores


class Tracker(Protocol):
    def log(self, values: dict[str, float], step: int) -> None: ...

    def close(self, ok: bool) -> None: ...


def missing_trackers_problem(names: Iterable[str]) -> str | None:
    """What to install for the trackers whose package is missing, in one line; None when all are there.

    Each tracker's module and extra carry its name (mlflow-skinny installs `mlflow`). Torch-free and
    without importing the packages, so the command line checks it before any model loads.
    """
    missing = [name for name in dict.fromkeys(names) if importlib.util.find_spec(name) is None]
    if not missing:
        return None
    return (
        f"train.report_to: {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not installed; "
        f"pip install 'rlhfdpo[{','.join(missing)}]'"
    )


def numeric_fields(record: dict) -> dict[str, float]:
    """The fields of a metrics record a tracker can plot: numbers and bools, not the step itself."""
    return {k: float(v) for k, v in record.items() if k != "step" and isinstance(v, (int, float))}


class TensorBoard:
    def __init__(self, root: Path, config: dict, stage: str, resume_step: int):
        from torch.utils.tensorboard import SummaryWriter

        folder = root / "tensorboard"
        if not resume_step:  # a fresh start keeps nothing, as metrics.jsonl keeps nothing
            shutil.rmtree(folder, ignore_errors=True)
        # purge_step: TensorBoard drops what earlier event files hold from that step on, so the
        # steps an interrupted run logged past its checkpoint do not show twice.
        self.writer = SummaryWriter(str(folder), purge_step=resume_step + 1 if resume_step else None)

    def log(self, values: dict[str, float], step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()  # on disk with its metrics.jsonl line, so a crash loses neither

    def close(self, ok: bool) -> None:
        self.writer.close()


class WandB:
    def __init__(self, root: Path, config: dict, stage: str, resume_step: int):
        import wandb

        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT") or PROJECT,
            name=root.resolve().name,
            dir=None if os.environ.get("WANDB_DIR") else str(root),  # None: wandb reads WANDB_DIR
            config=config,
            job_type=stage,
        )

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def close(self, ok: bool) -> None:
        self.run.finish(exit_code=0 if ok else 1)


class MLflow:
    def __init__(self, root: Path, config: dict, stage: str, resume_step: int):
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            uri = (root / "mlruns").resolve().as_uri()
            # MLflow 3 refuses a file store unless told it is wanted, and it is the one local store
            # mlflow-skinny has (a database store needs SQLAlchemy).
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(uri)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or PROJECT
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
        run = self.client.create_run(experiment_id, run_name=root.resolve().name, tags={"stage": stage})
        self.run_id = run.info.run_id
        params = [Param(key, str(value)[:MLFLOW_VALUE_LIMIT]) for key, value in flat_params(config).items()]
        for start in range(0, len(params), MLFLOW_PARAM_LIMIT):
            self.client.log_batch(self.run_id, params=params[start : start + MLFLOW_PARAM_LIMIT])

    def log(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])

    def close(self, ok: bool) -> None:
        self.client.set_terminated(self.run_id, "FINISHED" if ok else "FAILED")


class Trackio:
    def __init__(self, root: Path, config: dict, stage: str, resume_step: int):
        import trackio

        self.trackio = trackio
        trackio.init(project=PROJECT, name=root.resolve().name, config=config)

    def log(self, values: dict[str, float], step: int) -> None:
        self.trackio.log(values, step=step)

    def close(self, ok: bool) -> None:
        self.trackio.finish()


TRACKERS: dict[str, type] = {"tensorboard": TensorBoard, "wandb": WandB, "mlflow": MLflow, "trackio": Trackio}


def flat_params(tree: Any, prefix: str = "") -> dict[str, Any]:
    """A nested config as `section.key` -> value; lists stay whole (MLflow params are flat strings)."""
    if not isinstance(tree, dict):
        return {prefix[:-1]: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out |= flat_params(value, f"{prefix}{key}.")
    return out


class Trackers:
    """The open trackers of one run (none off the main process): each record goes to all of them."""

    def __init__(self, opened: dict[str, Tracker] | None = None):
        self.opened = dict(opened or {})
        if self.opened:  # a run that dies before its end still flushes its trackers and marks them failed
            atexit.register(self._close_at_exit)

    def log(self, record: dict) -> None:
        values, step = numeric_fields(record), record.get("step")
        if not values or step is None:  # a tracker places every value at a step
            return
        step = int(step)
        for name, tracker in list(self.opened.items()):
            try:
                tracker.log(values, step)
            except Exception as err:  # noqa: BLE001 - whatever a tracker's package raises stops that tracker, not the run
                del self.opened[name]
                console.print(
                    f"[yellow]warning:[/yellow] {name} stopped at step {step} ({plain(_first_line(err))}); "
                    "training goes on and metrics.jsonl has every record"
                )
                self._close_one(name, tracker, ok=False)

    def close(self, ok: bool = True) -> None:
        atexit.unregister(self._close_at_exit)
        opened, self.opened = self.opened, {}
        for name, tracker in opened.items():
            self._close_one(name, tracker, ok)

    def _close_at_exit(self) -> None:
        self.close(ok=False)

    @staticmethod
    def _close_one(name: str, tracker: Tracker, ok: bool) -> None:
        try:
            tracker.close(ok)
        except Exception as err:  # noqa: BLE001 - the run's own outputs are written; say what the tracker lost
            console.print(f"[yellow]warning:[/yellow] {name} did not close cleanly ({plain(_first_line(err))})")


def open_trackers(names: Iterable[str], root: Path, config: dict, stage: str, resume_step: int) -> Trackers:
    """Start every tracker `names` lists for the run in `root`, or fail in one line naming the one that cannot."""
    names = list(dict.fromkeys(names))
    problem = missing_trackers_problem(names)
    if problem:
        raise RunFailed(problem)
    opened: dict[str, Tracker] = {}
    for name in names:
        try:
            opened[name] = TRACKERS[name](root, config, stage, resume_step)
        except Exception as err:  # noqa: BLE001 - a tracker's package raises its own types (no login, no server)
            Trackers(opened).close(ok=False)
            raise RunFailed(
                f"train.report_to: {name} could not start ({_first_line(err)}); "
                f"fix that, or take {name} out of train.report_to"
            ) from None
    return Trackers(opened)


def _first_line(err: Exception) -> str:
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__
