"""Experiment trackers (`train.report_to`): each holds what metrics.jsonl holds, read back with its own reader.

One tiny SFT run logs to every tracker installed here, then resumes from its step-3 checkpoint; the
trackers whose package is missing are skipped. TensorBoard and W&B come with the dev extra.
"""

from __future__ import annotations

import importlib.util
import json
import struct
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from helpers import read_metrics, run_cli, run_ok, sets, tiny_sft_config, write_yaml
from pipeline.config import SFTConfig, config_from_dict
from pipeline.errors import RunFailed
from pipeline.launch import Dist, init_distributed
from pipeline.runs import RunDir
from pipeline.tracking import Trackers, missing_trackers_problem, numeric_fields

INSTALLED = [name for name in ("tensorboard", "wandb", "mlflow", "trackio") if importlib.util.find_spec(name)]
RESUMED_AT = 3  # the tiny run's only checkpoint


def numeric_records(records: list[dict]) -> list[tuple[int, dict[str, float]]]:
    """What the trackers get from metrics.jsonl: each record's step and numeric fields."""
    return [(r["step"], numeric_fields(r)) for r in records if numeric_fields(r)]


def by_tag(records: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """Every (step, value) a tag took, in the order metrics.jsonl has them."""
    out = defaultdict(list)
    for step, values in numeric_records(records):
        for key, value in values.items():
            out[key].append((step, value))
    return dict(out)


def by_step(records: list[dict]) -> dict[int, dict[str, float]]:
    """One row per step, a later record overwriting an earlier one's keys (how W&B merges a step)."""
    out: dict[int, dict[str, float]] = defaultdict(dict)
    for step, values in numeric_records(records):
        out[step] |= values
    return dict(out)


def resumed_records(run_dir: Path, first: list[dict]) -> list[dict]:
    """What the resumed run logged: metrics.jsonl after the lines it kept from the first run."""
    kept = [r for r in first if r["step"] <= RESUMED_AT]
    records = read_metrics(run_dir)
    assert records[: len(kept)] == kept
    return records[len(kept) :]


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory):
    """A tiny SFT run to every installed tracker, then `--resume` from step 3: (run dir, first run's records)."""
    if not INSTALLED:
        pytest.skip("no tracker package is installed")
    root = tmp_path_factory.mktemp("tracked")
    run_dir = root / "run"
    config = write_yaml(root / "sft.yaml", tiny_sft_config(run_dir, report_to=INSTALLED))
    with pytest.MonkeyPatch.context() as env:
        for name in ("WANDB_DIR", "WANDB_PROJECT", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME"):
            env.delenv(name, raising=False)
        env.setenv("WANDB_MODE", "offline")  # no network: the run stays in run/wandb/
        env.setenv("WANDB_SILENT", "true")
        env.setenv("TRACKIO_DIR", str(root / "trackio"))  # read when trackio is first imported
        run_ok("sft", str(config))
        first = read_metrics(run_dir)
        run_ok("sft", str(config), "--resume")
    return run_dir, first


# --------------------------------------------------------------------------------- each tracker


@pytest.mark.slow  # two tiny SFT runs through the command line
def test_tensorboard_events_hold_every_value_of_metrics_jsonl_once(tracked_run):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, first = tracked_run
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0}).Reload()
    expected = by_tag(read_metrics(run_dir))
    assert {"loss", "eval/loss", "lr", "params/total"} <= set(expected)
    assert "params/per_rank" not in events.Tags()["scalars"]  # a list stays in metrics.jsonl alone
    assert sorted(events.Tags()["scalars"]) == sorted(expected)
    # The resumed run replayed steps 4-6: what the first run logged there was purged, not doubled.
    assert [s for s, _ in expected["loss"]] == [1, 2, 3, 4, 5, 6]
    for tag, values in expected.items():
        got = [(e.step, e.value) for e in events.Scalars(tag)]
        assert [s for s, _ in got] == [s for s, _ in values], tag
        assert [v for _, v in got] == pytest.approx([v for _, v in values], rel=1e-6), tag  # float32 in events


def wandb_records(path: Path):
    """The protobuf records of a .wandb file (a LevelDB-style log of 32 KiB blocks after a 7-byte header)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, chunk = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunk)
            chunk = b""
            yield record


def wandb_run(folder: Path) -> tuple[dict, dict[int, dict[str, float]]]:
    """(run record's name, project and config; history by step) of an offline run folder."""
    (path,) = folder.glob("run-*.wandb")
    run, history = {}, {}
    for record in wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            config = {item.key: json.loads(item.value_json) for item in record.run.config.update}
            run = {"name": record.run.display_name, "project": record.run.project, "config": config}
        elif kind == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            history[row["_step"]] = {k: v for k, v in row.items() if not k.startswith("_")}
    return run, history


@pytest.mark.slow  # two tiny SFT runs through the command line
def test_wandb_offline_runs_hold_the_history_of_metrics_jsonl(tracked_run):
    pytest.importorskip("wandb")
    run_dir, first = tracked_run
    fresh, resumed = sorted((run_dir / "wandb").glob("offline-run-*"))
    run, history = wandb_run(fresh)
    assert run["name"] == "run" and run["project"] == "rlhfdpo"
    assert run["config"]["train"]["report_to"] == INSTALLED and run["config"]["optim"]["lr"] == 1e-2
    expected = by_step(first)
    assert sorted(history) == sorted(expected) == [0, 1, 2, 3, 4, 5, 6]
    for step, values in expected.items():
        assert history[step] == pytest.approx(values), step
    # The resumed run is a W&B run of its own, from the checkpoint's step on.
    _, history = wandb_run(resumed)
    expected = by_step(resumed_records(run_dir, first))
    assert sorted(history) == [RESUMED_AT, 4, 5, 6]
    for step, values in expected.items():
        assert history[step] == pytest.approx(values), step


@pytest.mark.slow  # two tiny SFT runs through the command line
def test_mlflow_file_store_holds_the_metric_history_of_metrics_jsonl(tracked_run):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    run_dir, first = tracked_run
    client = MlflowClient((run_dir / "mlruns").resolve().as_uri())
    experiment = client.get_experiment_by_name("rlhfdpo")
    fresh, resumed = sorted(client.search_runs([experiment.experiment_id]), key=lambda r: r.info.start_time)
    assert fresh.info.run_name == "run" and fresh.info.status == resumed.info.status == "FINISHED"
    assert fresh.data.tags["stage"] == "sft" and fresh.data.params["optim.lr"] == "0.01"
    for run, records in ((fresh, first), (resumed, resumed_records(run_dir, first))):
        for tag, values in by_tag(records).items():
            got = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, tag))
            assert [s for s, _ in got] == [s for s, _ in sorted(values)], tag
            assert [v for _, v in got] == pytest.approx([v for _, v in sorted(values)]), tag


@pytest.mark.slow  # two tiny SFT runs through the command line
def test_trackio_store_holds_the_logs_of_metrics_jsonl(tracked_run):
    pytest.importorskip("trackio")
    from trackio.sqlite_storage import SQLiteStorage

    run_dir, first = tracked_run
    fresh, resumed = sorted(SQLiteStorage.get_run_records("rlhfdpo"), key=lambda r: r["created_at"])
    assert fresh["name"] == resumed["name"] == "run"
    for run, records in ((fresh, first), (resumed, resumed_records(run_dir, first))):
        logs = SQLiteStorage.get_logs("rlhfdpo", run_id=run["id"])
        got = [(log["step"], {k: v for k, v in log.items() if k not in ("step", "timestamp")}) for log in logs]
        expected = numeric_records(records)
        assert [s for s, _ in got] == [s for s, _ in expected]
        for (_, values), (_, want) in zip(got, expected):
            assert values == pytest.approx(want)


# ------------------------------------------------------------------------- missing packages, failures


def test_a_missing_tracker_package_fails_in_one_line_before_any_model_loads(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # what `import wandb` finds when it is not installed
    config = write_yaml(tmp_path / "sft.yaml", tiny_sft_config(tmp_path / "run"))
    result = run_cli("sft", str(config), *sets("train.report_to=[tensorboard,wandb]"))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines == [f"error: {config}: train.report_to: wandb is not installed; pip install 'rlhfdpo[wandb]'"]
    assert not (tmp_path / "run").exists()


def test_missing_packages_are_named_together():
    assert missing_trackers_problem([]) is None
    assert missing_trackers_problem(["no_such_tracker_a", "no_such_tracker_b", "no_such_tracker_a"]) == (
        "train.report_to: no_such_tracker_a, no_such_tracker_b are not installed; "
        "pip install 'rlhfdpo[no_such_tracker_a,no_such_tracker_b]'"
    )


def test_a_stage_run_without_the_command_line_still_fails_on_a_missing_package(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)
    run_dir = RunDir(tmp_path / "run", init_distributed())
    run_dir.write_config(config_from_dict(SFTConfig, tiny_sft_config(tmp_path / "run", report_to=["mlflow"])))
    with pytest.raises(RunFailed, match=r"^train.report_to: mlflow is not installed; pip install 'rlhfdpo\[mlflow\]'$"):
        run_dir.start_metrics(0)


def test_only_the_main_process_opens_trackers(tmp_path):
    pytest.importorskip("tensorboard")
    second = Dist(rank=1, world_size=1, local_rank=1, device=init_distributed().device)
    run_dir = RunDir(tmp_path / "run", second)
    run_dir.write_config(config_from_dict(SFTConfig, tiny_sft_config(tmp_path / "run", report_to=["tensorboard"])))
    run_dir.start_metrics(0)
    run_dir.log({"step": 1, "loss": 1.0})
    assert not (tmp_path / "run" / "tensorboard").exists() and not run_dir.trackers.opened


class Recorder:
    def __init__(self, fail_at: int | None = None):
        self.fail_at, self.logged, self.closed = fail_at, [], []

    def log(self, values: dict[str, float], step: int) -> None:
        if step == self.fail_at:
            raise OSError("No space left on device\nmore detail")
        self.logged.append((step, values))

    def close(self, ok: bool) -> None:
        self.closed.append(ok)


def test_a_tracker_that_fails_mid_run_is_stopped_with_one_warning_and_metrics_jsonl_stays_whole(tmp_path, capsys):
    run_dir = RunDir(tmp_path / "run", init_distributed())
    run_dir.start_metrics(0)
    failing, healthy = Recorder(fail_at=2), Recorder()
    run_dir.trackers = Trackers({"wandb": failing, "tensorboard": healthy})
    records = [
        {"step": step, "loss": 1.0 / step, "cache_hit": step == 1, "params/per_rank": [3, 4], "note": "x"}
        for step in (1, 2, 3)
    ]
    for record in records:
        run_dir.log(record)
    assert run_dir.read_metrics() == records
    assert failing.logged == [(1, {"loss": 1.0, "cache_hit": 1.0})] and failing.closed == [False]
    assert [step for step, _ in healthy.logged] == [1, 2, 3] and healthy.logged[1][1] == {"loss": 0.5, "cache_hit": 0.0}
    err = " ".join(capsys.readouterr().err.split())  # the console wraps long lines
    assert err.count("wandb stopped") == 1
    assert (
        "warning: wandb stopped at step 2 (OSError: No space left on device); training goes on and metrics.jsonl "
        "has every record"
    ) in err
    run_dir.trackers.close()
    assert healthy.closed == [True] and failing.closed == [False]
