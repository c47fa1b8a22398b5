"""An experiment's scheduler (`jobs`): which steps start together, what each is given of the machine,
and what a failure stops. Steps are stand-in processes here; test_experiment runs the real ones."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time

import pytest

from pipeline import experiment
from pipeline.config import ExperimentConfig, StepSpec
from pipeline.errors import RunFailed


def test_a_lone_step_keeps_the_whole_machine():
    environ = {"PATH": "/bin", "CUDA_VISIBLE_DEVICES": "0,1"}
    assert experiment.slot_environment(0, 1, environ, cpus=16, gpus=2) == environ


def test_steps_at_once_split_the_cores_and_the_gpus():
    first = experiment.slot_environment(0, 2, {}, cpus=16, gpus=4)
    second = experiment.slot_environment(1, 2, {}, cpus=16, gpus=4)
    assert (first["OMP_NUM_THREADS"], first["CUDA_VISIBLE_DEVICES"]) == ("8", "0,2")
    assert (second["OMP_NUM_THREADS"], second["CUDA_VISIBLE_DEVICES"]) == ("8", "1,3")
    # The user's visible GPUs are the ones split; fewer GPUs than steps: they are shared in turn.
    assert experiment.slot_environment(1, 2, {"CUDA_VISIBLE_DEVICES": "5,7"}, 2, 8)["CUDA_VISIBLE_DEVICES"] == "7"
    assert experiment.slot_environment(2, 3, {}, cpus=2, gpus=2)["CUDA_VISIBLE_DEVICES"] == "0"
    on_cpu = experiment.slot_environment(1, 3, {}, cpus=2, gpus=0)
    assert on_cpu["OMP_NUM_THREADS"] == "1" and "CUDA_VISIBLE_DEVICES" not in on_cpu
    # A thread count the user set stands.
    assert experiment.slot_environment(0, 2, {"OMP_NUM_THREADS": "3"}, cpus=16, gpus=0)["OMP_NUM_THREADS"] == "3"


def test_jobs_below_one_is_rejected():
    from pipeline.config import ConfigError

    with pytest.raises(ConfigError, match="jobs: must be at least 1"):
        ExperimentConfig(steps=[StepSpec("sft", "sft", "configs/sft.yaml")], jobs=0).check()


@pytest.fixture
def stand_ins(monkeypatch, tmp_path):
    """Each step a short process exiting with `exits[name]` (0 unless named) once the steps named in
    `holds[name]` have been seen finished; `events` records starts (name, share) and the steps the
    scheduler saw finish, in order."""
    events: list = []
    exits: dict[str, int] = {}
    holds: dict[str, list[str]] = {}

    def stamp(step, upstream):
        return step.name + "|" + ",".join(upstream), tmp_path / step.name.replace("/", "-")

    def start(step, stamp_, output, slot, share, gpus, logged, server):
        output.mkdir(parents=True, exist_ok=True)
        (output / experiment.LOG).write_text(f"the output of {step.name}\n")
        events.append(("start", step.name, share))
        seen = [str(tmp_path / f"{name}.seen") for name in holds.get(step.name, [])]
        script = (
            "import os, sys, time\n"
            f"while not all(os.path.exists(p) for p in {seen!r}): time.sleep(0.02)\n"
            f"sys.exit({exits.get(step.name, 0)})"
        )
        process = subprocess.Popen([sys.executable, "-c", script])
        return experiment.Running(step, stamp_, output, slot, process, time.monotonic(), output / experiment.LOG)

    wait = experiment._wait_for_one

    def wait_for_one(running):
        done = wait(running)
        events.append(("done", done.step.name))
        (tmp_path / f"{done.step.name}.seen").touch()
        return done

    monkeypatch.setattr(experiment, "step_stamp", stamp)
    monkeypatch.setattr(experiment, "_start", start)
    monkeypatch.setattr(experiment, "_wait_for_one", wait_for_one)
    monkeypatch.setattr(experiment, "_cuda_devices", lambda: 0)
    return events, exits, holds, tmp_path


def plan(jobs: int) -> ExperimentConfig:
    return ExperimentConfig(
        steps=[
            StepSpec("sft", "sft", "configs/sft.yaml"),
            StepSpec("a", "dpo", "configs/dpo.yaml", after=["sft"]),
            StepSpec("b", "dpo", "configs/dpo.yaml", after=["sft"]),
            StepSpec("c", "dpo", "configs/dpo.yaml", after=["sft"]),
            StepSpec("compare", "compare", "configs/compare.yaml", after=["a", "b", "c"]),
        ],
        jobs=jobs,
        fork_steps=False,  # the stand-ins are processes of their own
    )


def test_ready_steps_start_together_up_to_jobs_and_a_step_waits_for_what_it_reads(stand_ins):
    events, *_ = stand_ins
    experiment.run(plan(jobs=2))
    starts = [e for e in events if e[0] == "start"]
    assert starts[0] == ("start", "sft", 1) and starts[-1] == ("start", "compare", 1)  # alone: whole machine
    assert events[1:4] == [("done", "sft"), ("start", "a", 2), ("start", "b", 2)]  # both before any wait
    assert events.index(("start", "c", 2)) > 4  # the third waits for a free slot
    compare = events.index(("start", "compare", 1))
    assert all(events.index(("done", name)) < compare for name in "abc")


def test_one_job_runs_the_steps_in_listed_order_each_with_the_whole_machine(stand_ins):
    events, *_ = stand_ins
    experiment.run(plan(jobs=1))
    assert [e for e in events if e[0] == "start"] == [("start", n, 1) for n in ("sft", "a", "b", "c", "compare")]


def test_a_failed_step_stops_new_starts_lets_running_ones_finish_and_names_its_log(stand_ins):
    events, exits, holds, work = stand_ins
    exits["a"] = 3
    holds["b"] = ["a"]  # b finishes after a has failed, so that c could start but must not
    with pytest.raises(RunFailed, match=r"step a failed with exit status 3 \(its output: .*a/experiment.log\)"):
        experiment.run(plan(jobs=2))
    assert ("start", "c", 2) not in events and ("start", "compare", 1) not in events
    assert ("done", "b") in events and (work / "b" / experiment.STAMP).is_file()  # kept, and reused next time
    assert not (work / "a" / experiment.STAMP).exists()


def test_a_step_run_again_runs_the_steps_that_read_it_again(stand_ins, monkeypatch):
    """Its config unchanged, a step whose output was removed runs again and makes new outputs (other
    weights, when the code changed in between): the comparison that read the old ones is not reused."""
    events, _, _, work = stand_ins
    monkeypatch.setattr(experiment, "finished", lambda output, stage: (output / experiment.LOG).is_file())
    experiment.run(plan(jobs=1))
    events.clear()
    experiment.run(plan(jobs=1))
    assert [e for e in events if e[0] == "start"] == []  # all reused
    shutil.rmtree(work / "a")
    experiment.run(plan(jobs=1))
    assert [e[1] for e in events if e[0] == "start"] == ["a", "compare"]


def test_a_stamp_from_before_run_ids_is_still_reused(tmp_path, monkeypatch):
    monkeypatch.setattr(experiment, "finished", lambda output, stage: True)
    (tmp_path / experiment.STAMP).write_text("abc123")
    assert experiment._reusable(tmp_path, "dpo", "abc123") == "abc123"
    (tmp_path / experiment.STAMP).write_text("abc123 f00d")
    assert experiment._reusable(tmp_path, "dpo", "abc123") == "abc123 f00d"
    assert experiment._reusable(tmp_path, "dpo", "other") is None


def test_jobs_below_one_on_the_command_line_is_one_line_before_any_step(tmp_path):
    from helpers import ROOT, run_cli, sets

    result = run_cli("experiment", "configs/experiment-quick.yaml", *sets("jobs=0"), cwd=ROOT)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "jobs: must be at least 1, got 0" in result.stderr and "running" not in result.stdout
